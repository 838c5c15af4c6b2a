//! The conflicts inbox: every item an operator must look at (concurrent field values, name
//! collisions, equivocations, refused changes, held changes, missing files), read from the
//! store's indexes, never by scanning the documents.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use tidesync_proto::DocId;

use super::{ReadError, Reads, read_err};
use crate::store::HeldFilter;

/// Most items of one kind an inbox listing shows; status and metrics count them all.
pub const MAX_INBOX_ITEMS_PER_KIND: usize = 1_000;
/// Most missing dependencies listed for one object's held changes.
pub const MAX_WAITING_FOR_LISTED: usize = 16;

/// One item of the conflicts inbox. `kind` says which:
/// - `fields`: fields written concurrently on several nodes (`fields` lists each value);
/// - `name`, `replaced-by-view`: two documents that arrived under one name: the one stored
///   under its own name and the one renamed `id~<hex>`. Both are kept and reachable;
/// - `equivocation`: an author signed two changes with one actor and sequence number;
/// - `refused`: a change a peer sent that a policy rule refused (the refusal log);
/// - `held`: changes held until what they depend on arrives;
/// - `file`: a wanted file that has not arrived (`ty` and `id` are empty).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Conflict {
    #[serde(rename = "type")]
    pub ty: String,
    /// The name both documents have at their origins.
    pub id: String,
    /// The local name the second document got here.
    pub local_id: String,
    pub doc: String,
    pub origin: String,
    /// The document holding the plain name here, and its origin.
    pub holder: Option<String>,
    pub holder_origin: Option<String>,
    /// `fields`, `refused`, `held`, `file` (above), or `name`: two documents arrived under one name. `replaced-by-view`: this node held the
    /// object in full when its publisher began to share only a view of it (`fields`); the view
    /// has the name, the object as it was is kept here. `equivocation`: an author signed two
    /// different changes with one actor and sequence number in this document.
    #[serde(default = "name_kind")]
    pub kind: String,
    /// The evidence, for an `equivocation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equivocation: Option<EquivocationReport>,
    /// The fields with concurrent values, for `fields`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<crate::concurrent::ConcurrentField>,
    /// Who sent what and which rule refused it, for `refused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<RefusalReport>,
    /// What the object's held changes wait for, for `held`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<HeldWait>,
    /// The wanted file and why it has not arrived, for `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileWait>,
}

fn name_kind() -> String {
    "name".into()
}

/// An equivocation's evidence as `conflicts` shows it: both changes are kept and relayed, and
/// refused here with every change that depends on them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EquivocationReport {
    /// The node whose key signed both changes (its PeerId).
    pub author: String,
    /// The Automerge actor both claim (hex) and their sequence number.
    pub actor: String,
    pub seq: u64,
    /// The hashes of the change this node had first and of the one contradicting it.
    pub first: String,
    pub second: String,
    /// When this node found it, Unix milliseconds.
    pub detected_ms: i64,
}

/// A refused change, as the inbox lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusalReport {
    /// The peer that sent it (its PeerId).
    pub peer: String,
    /// The rule, in a word, and as a sentence.
    pub rule: String,
    pub reason: String,
    pub time_ms: i64,
}

/// An object's held changes and what they wait for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldWait {
    pub changes: u64,
    /// The peers they came from (PeerIds).
    pub from: Vec<String>,
    /// When the oldest arrived, Unix milliseconds.
    pub since_ms: i64,
    /// The hashes of changes they depend on that this node has not got (at most
    /// [`MAX_WAITING_FOR_LISTED`]).
    pub waiting_for: Vec<String>,
}

/// A wanted file that has not arrived.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileWait {
    pub hash: String,
    pub size: u64,
    /// Segments verified and stored, of all.
    pub segments_done: u64,
    pub segments: u64,
    /// The peers it is asked of (PeerIds).
    pub sources: Vec<String>,
    /// Why it has not arrived, as a sentence.
    pub why: String,
}

impl Conflict {
    /// An item of `kind` with nothing filled in.
    fn empty(kind: &str) -> Conflict {
        Conflict {
            ty: String::new(),
            id: String::new(),
            local_id: String::new(),
            doc: String::new(),
            origin: String::new(),
            holder: None,
            holder_origin: None,
            kind: kind.into(),
            equivocation: None,
            fields: Vec::new(),
            refusal: None,
            held: None,
            file: None,
        }
    }

    /// An item of `kind` about document `doc`, named as this node names it.
    fn about(reads: &Reads, kind: &str, doc: &DocId) -> Result<Conflict, ReadError> {
        let rec = reads
            .store
            .record(doc)
            .map_err(read_err(format_args!("document {doc}")))?;
        Ok(Conflict {
            ty: rec.as_ref().map(|r| r.ty.to_string()).unwrap_or_default(),
            id: rec.as_ref().map(|r| r.id.to_string()).unwrap_or_default(),
            local_id: rec
                .as_ref()
                .map(|r| r.local_id.to_string())
                .unwrap_or_default(),
            doc: doc.to_string(),
            origin: rec.map(|r| r.origin.to_string()).unwrap_or_default(),
            ..Conflict::empty(kind)
        })
    }
}

impl Reads {
    /// The conflicts inbox: every item of every kind (see [`Conflict`]), from the store's
    /// indexes, at most [`MAX_INBOX_ITEMS_PER_KIND`] of each kind.
    pub fn conflicts(&self) -> Result<Vec<Conflict>, ReadError> {
        let mut out = self.concurrent_fields()?;
        out.extend(self.collisions_and_equivocations()?);
        out.extend(self.refused()?);
        out.extend(self.held_waits()?);
        out.extend(self.missing_files()?);
        Ok(out)
    }

    /// Name collisions and equivocations.
    fn collisions_and_equivocations(&self) -> Result<Vec<Conflict>, ReadError> {
        let err = read_err("the name collisions");
        let collisions = self
            .store
            .collisions(MAX_INBOX_ITEMS_PER_KIND)
            .map_err(err)?;
        let mut out = Vec::with_capacity(collisions.len());
        for (doc, rec) in collisions {
            let holder = self
                .find(&rec.ty, &rec.id)
                .map_err(read_err("the name collisions"))?;
            out.push(Conflict {
                ty: rec.ty.to_string(),
                id: rec.id.to_string(),
                local_id: rec.local_id.to_string(),
                doc: doc.to_string(),
                origin: rec.origin.to_string(),
                kind: match &holder {
                    Some((view, _))
                        if *view
                            == DocId::derive_view(&rec.origin, &self.node, &rec.ty, &rec.id) =>
                    {
                        "replaced-by-view".into()
                    }
                    _ => name_kind(),
                },
                holder: holder.as_ref().map(|(d, _)| d.to_string()),
                holder_origin: holder.map(|(_, r)| r.origin.to_string()),
                ..Conflict::empty("name")
            });
        }
        let err = read_err("the equivocations");
        for e in self
            .store
            .equivocations()
            .map_err(err)?
            .into_iter()
            .take(MAX_INBOX_ITEMS_PER_KIND)
        {
            let hash = |c: &tidesync_proto::SignedChange| {
                tidesync_proto::chunk::ChangeHeader::parse(&c.bytes)
                    .map(|h| hex::encode(h.hash))
                    .unwrap_or_default()
            };
            out.push(Conflict {
                equivocation: Some(EquivocationReport {
                    author: e.author.to_string(),
                    actor: hex::encode(&e.actor),
                    seq: e.seq,
                    first: hash(&e.first),
                    second: hash(&e.second),
                    detected_ms: e.detected_ms,
                }),
                ..Conflict::about(self, "equivocation", &e.doc)?
            });
        }
        Ok(out)
    }

    /// The documents whose fields hold concurrent values, each with those fields.
    fn concurrent_fields(&self) -> Result<Vec<Conflict>, ReadError> {
        let what = "the fields with concurrent values";
        let docs = self.store.concurrent_docs().map_err(read_err(what))?;
        let mut out = Vec::new();
        for (doc_id, _) in docs.into_iter().take(MAX_INBOX_ITEMS_PER_KIND) {
            let Some(doc) = self.store.load_doc(&doc_id).map_err(read_err(what))? else {
                continue;
            };
            let fields = crate::concurrent::list(&doc);
            if fields.is_empty() {
                continue;
            }
            out.push(Conflict {
                fields,
                ..Conflict::about(self, "fields", &doc_id)?
            });
        }
        Ok(out)
    }

    /// The refusal log, newest first.
    fn refused(&self) -> Result<Vec<Conflict>, ReadError> {
        let rows = self
            .store
            .refusals(MAX_INBOX_ITEMS_PER_KIND)
            .map_err(read_err("the refusal log"))?;
        Ok(rows
            .into_iter()
            .map(|r| Conflict {
                ty: r.ty,
                id: r.id,
                doc: r.doc.to_string(),
                refusal: Some(RefusalReport {
                    peer: r.peer.to_string(),
                    rule: r.rule,
                    reason: r.reason,
                    time_ms: r.time_ms,
                }),
                ..Conflict::empty("refused")
            })
            .collect())
    }

    /// The held changes, by object, with the dependencies they wait for.
    fn held_waits(&self) -> Result<Vec<Conflict>, ReadError> {
        let what = "the held changes";
        let rows = self
            .store
            .held_rows(HeldFilter::default(), crate::held::MAX_HELD_LISTED)
            .map_err(read_err(what))?;
        let held: HashSet<[u8; 32]> = rows.iter().map(|(h, _)| *h).collect();
        let reader = self.store.reader().map_err(read_err(what))?;
        let mut by_doc: BTreeMap<DocId, (HeldWait, BTreeSet<[u8; 32]>)> = BTreeMap::new();
        for (_, row) in &rows {
            let (wait, deps) = by_doc.entry(row.header.doc).or_insert_with(|| {
                (
                    HeldWait {
                        changes: 0,
                        from: Vec::new(),
                        since_ms: row.since_ms,
                        waiting_for: Vec::new(),
                    },
                    BTreeSet::new(),
                )
            });
            wait.changes += 1;
            wait.since_ms = wait.since_ms.min(row.since_ms);
            if let Some(from) = row.from.map(|f| f.to_string())
                && !wait.from.contains(&from)
            {
                wait.from.push(from);
            }
            if let Ok(h) = tidesync_proto::chunk::ChangeHeader::parse(&row.change.bytes) {
                deps.extend(h.deps.into_iter().filter(|d| !held.contains(d)));
            }
        }
        let mut out = Vec::new();
        for (doc, (mut wait, deps)) in by_doc.into_iter().take(MAX_INBOX_ITEMS_PER_KIND) {
            for dep in deps {
                if wait.waiting_for.len() >= MAX_WAITING_FOR_LISTED {
                    break;
                }
                if !reader
                    .has_change(&doc, &automerge::ChangeHash(dep))
                    .map_err(read_err(what))?
                {
                    wait.waiting_for.push(hex::encode(dep));
                }
            }
            let header = rows
                .iter()
                .find(|(_, r)| r.header.doc == doc)
                .map(|(_, r)| r.header.clone());
            let mut item = Conflict::about(self, "held", &doc)?;
            if let Some(h) = header
                && item.ty.is_empty()
            {
                item.ty = h.ty.to_string();
                item.id = h.id.to_string();
                item.origin = h.origin.to_string();
            }
            item.held = Some(wait);
            out.push(item);
        }
        Ok(out)
    }

    /// The wanted files that have not arrived, and why.
    fn missing_files(&self) -> Result<Vec<Conflict>, ReadError> {
        let wants = self.store.wants().map_err(read_err("the want-list"))?;
        Ok(wants
            .iter()
            .take(MAX_INBOX_ITEMS_PER_KIND)
            .map(|w| {
                let segments = tidesync_proto::files::FileAsk::segments(w.size);
                let segments_done = w.done.iter().map(|b| u64::from(b.count_ones())).sum();
                let why = match &w.last_error {
                    _ if w.on_demand => "fetched only when read (files = on-demand)".to_string(),
                    Some(e) => format!("the last attempt failed: {e}"),
                    None if segments_done > 0 => "arriving".to_string(),
                    None => "waiting for a source to be connected".to_string(),
                };
                Conflict {
                    file: Some(FileWait {
                        hash: w.hash.to_string(),
                        size: w.size,
                        segments_done,
                        segments,
                        sources: w.sources.iter().map(ToString::to_string).collect(),
                        why,
                    }),
                    ..Conflict::empty("file")
                }
            })
            .collect())
    }
}
