//! Per-peer policies: what each peer may be sent and what is taken from it, decided in pure code.
//!
//! A policy lives with its peer in the config file (`PeerConfig` in `config.rs`). The same
//! rules run at both ends: the sender filters what it offers (see [`Policies::may_send`]) and the
//! receiver checks every change against its own policy for the peer that sent it
//! (see [`Policies::may_take`]), so a misconfigured or malicious peer cannot push what we do not
//! accept. Local writes are checked by [`Policies::may_write`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tidesync_proto::{NodeId, ObjectId, TypeName};

use crate::model::DocRecord;

/// Which way objects flow between this node and a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Both ways.
    #[default]
    Both,
    /// We only send to this peer: it never changes our data.
    Send,
    /// We only take from this peer: it never gets ours.
    Receive,
}

/// What may pass between this node and one peer. Empty lists mean "no such rule".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Policy {
    pub direction: Direction,
    /// The types exchanged with this peer; empty means all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<TypeName>,
    /// Types never sent to or taken from this peer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<TypeName>,
    /// Types whose objects come from this peer alone: nobody here may change them, and changes
    /// to them from anyone but this peer are rejected.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub read_only: Vec<TypeName>,
    /// Types for which this peer's changes are taken only to objects this node created.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub update_only: Vec<TypeName>,
    /// Types sent to this peer but never taken from it (the other side of a peer's
    /// `read-only`: a hub that owns `Method` sends it and refuses edits to it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub send_only: Vec<TypeName>,
    /// Prefix for the local names of this peer's objects of the `prefixed` types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Types whose objects from this peer appear here under `prefix`. They are this peer's own:
    /// they are sent back to it and to no other peer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prefixed: Vec<TypeName>,
    /// The fields of each type that reference other objects, each with the one type it may
    /// reference (see [`Policy::references`]). An object sent to this peer takes the objects
    /// it references of that type with it, even a type `types` does not list, and those then
    /// stay up to date at the peer; from this peer we take the objects its objects reference
    /// in the same way. `skip` always wins, at both ends.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub refs: BTreeMap<TypeName, Vec<RefField>>,
    /// The only fields of each type this peer is sent (one-way publishing). The peer gets a
    /// view of each such object, a separate document this node writes and signs with just
    /// those fields, never the object's own changes; changes to these types from the peer
    /// are refused.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<TypeName, Vec<String>>,
    /// Whether the files our objects refer to move with them (see [`FilesMode`]). Each end
    /// applies its own: the receiver to what it fetches, the sender to what it serves.
    #[serde(skip_serializing_if = "FilesMode::is_default")]
    pub files: FilesMode,
    /// Largest file fetched from or served to this peer, in bytes; none means
    /// [`crate::files::MAX_FILE_BYTES`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_file_bytes: Option<u64>,
    /// What the link to this peer may carry: `max-rate`, `windows`, `budget` (see
    /// [`crate::link`]); in `config.toml`, the peer's `[peers.link]` table.
    #[serde(skip_serializing_if = "crate::link::Link::is_default")]
    pub link: crate::link::Link,
    /// Types whose changes go to this peer ahead of the rest of our log (`Message::Ahead`): a
    /// ship's sample records before a month of annotations. Each such change still crosses
    /// once: the batches in log order leave out what the peer acknowledged ahead. Types sent
    /// as views (`fields`) and objects carried by `refs` go in log order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub priority: Vec<TypeName>,
    /// Whether the status records of other nodes (the fleet view) pass between this node and
    /// this peer, each way its `direction` allows: we send it those we hold, and take those it
    /// relays, so that a hub beyond this one sees the whole fleet. Off by default: a node's
    /// own record goes to its direct peers and no further.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub relay_status: bool,
}

/// When the files that objects exchanged with a peer refer to move.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FilesMode {
    /// As soon as an object referring to one arrives.
    #[default]
    Eager,
    /// When a read (`GET /v1/files/{hash}`, `tidesync file get`) first asks for it; the read
    /// waits while it is fetched.
    OnDemand,
    /// Never: objects keep their references, the bytes stay where they are.
    Never,
}

impl FilesMode {
    fn is_default(&self) -> bool {
        *self == FilesMode::default()
    }
}

/// A field that references objects of one type, written `field:Type` in the config file and
/// after `--refs TYPE=`: `owner:User` is the field `owner`, holding references to `User`s.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RefField {
    pub field: String,
    /// The only type the field's references are followed to.
    pub target: TypeName,
}

impl TryFrom<String> for RefField {
    type Error = String;
    fn try_from(s: String) -> Result<RefField, String> {
        let Some((field, target)) = s.split_once(':') else {
            return Err(format!(
                "reference field {s:?} names no target type: write FIELD:TYPE, for example --refs Volume=owner:User,label_trees:LabelTree (in config.toml: Volume = [\"owner:User\", \"label_trees:LabelTree\"])"
            ));
        };
        let field = field.trim();
        if field.is_empty() {
            return Err(format!("reference field {s:?} has no field name"));
        }
        let target = TypeName::new(target.trim())
            .map_err(|e| format!("reference field {s:?}: target type: {e}"))?;
        Ok(RefField {
            field: field.to_string(),
            target,
        })
    }
}

impl From<RefField> for String {
    fn from(r: RefField) -> String {
        format!("{}:{}", r.field, r.target)
    }
}

impl Policy {
    /// Whether `ty` is exchanged with this peer at all (`types` and `skip`).
    pub fn covers(&self, ty: &TypeName) -> bool {
        (self.types.is_empty() || self.types.contains(ty)) && !self.skip.contains(ty)
    }

    /// The objects that `fields`, an object of type `ty`, references through the fields this
    /// policy names for `ty` in `refs`: only references to each field's target type, and
    /// never to a skipped type.
    pub fn references(
        &self,
        ty: &TypeName,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Vec<(TypeName, ObjectId)> {
        let Some(named) = self.refs.get(ty) else {
            return Vec::new();
        };
        named
            .iter()
            .filter(|r| !self.skip.contains(&r.target))
            .flat_map(|r| {
                let values: Vec<&serde_json::Value> = match fields.get(&r.field) {
                    Some(serde_json::Value::Array(items)) => items.iter().collect(),
                    Some(other) => vec![other],
                    None => Vec::new(),
                };
                values
                    .into_iter()
                    .filter_map(|v| parse_reference(v.as_str()?))
                    .filter(|(t, _)| *t == r.target)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Whether objects of `ty` may be carried by reference (see [`Policy::refs`]): some
    /// reference field targets `ty`, and `ty` is not skipped.
    pub fn carries(&self, ty: &TypeName) -> bool {
        !self.skip.contains(ty) && self.refs.values().flatten().any(|r| r.target == *ty)
    }

    /// The local name of this peer's object `ty/id`: prefixed if the policy says so, else the
    /// id itself. An id that cannot take the prefix (too long with it) is refused: keeping
    /// its raw name would put it in another namespace, perhaps another peer's.
    pub fn local_name(&self, ty: &TypeName, id: &ObjectId) -> Result<ObjectId, Refusal> {
        match &self.prefix {
            Some(prefix) if self.prefixed.contains(ty) => ObjectId::new(format!("{prefix}{id}"))
                .map_err(|e| Refusal::Unprefixable {
                    ty: ty.clone(),
                    id: id.to_string(),
                    detail: e.to_string(),
                }),
            _ => Ok(id.clone()),
        }
    }

    /// Whether `self` lets through everything `old` did (so nothing needs resending).
    pub fn is_within(&self, old: &Policy) -> bool {
        let subset = |a: &[TypeName], b: &[TypeName]| a.iter().all(|t| b.contains(t));
        let dir_ok = self.direction == old.direction || old.direction == Direction::Both;
        let types_ok = if self.types.is_empty() {
            old.types.is_empty()
        } else {
            old.types.is_empty() || subset(&self.types, &old.types)
        };
        dir_ok
            && types_ok
            && subset(&old.skip, &self.skip)
            && subset(&old.update_only, &self.update_only)
            && subset(&old.send_only, &self.send_only)
            && self.read_only == old.read_only
            && self.prefix == old.prefix
            && self.prefixed == old.prefixed
            && self.refs.iter().all(|(ty, named)| {
                old.refs
                    .get(ty)
                    .is_some_and(|old_named| named.iter().all(|r| old_named.contains(r)))
            })
            && old.fields.iter().all(|(ty, old_fields)| {
                self.fields
                    .get(ty)
                    .is_some_and(|fields| fields.iter().all(|f| old_fields.contains(f)))
            })
    }

    /// Whether objects of `ty` go to this peer as views (see [`Policy::fields`]).
    pub fn publishes_view(&self, ty: &TypeName) -> bool {
        self.fields.contains_key(ty) && self.covers(ty) && self.direction != Direction::Receive
    }

    /// `fields` keeping only what this policy publishes of an object of type `ty`, or `None`
    /// when the type is not published as a view (see [`Policy::fields`]).
    pub fn view(
        &self,
        ty: &TypeName,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<serde_json::Map<String, serde_json::Value>> {
        let allowed = self.fields.get(ty)?;
        Some(
            fields
                .iter()
                .filter(|(k, _)| allowed.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// Whether a file of `size` bytes moves between this node and the peer at all, under
    /// this end's rule.
    pub fn moves_file(&self, size: u64) -> bool {
        self.files != FilesMode::Never
            && size <= self.max_file_bytes.unwrap_or(crate::files::MAX_FILE_BYTES)
    }

    /// Check the policy's own consistency; an error says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        self.link.validate()?;
        if !self.prefixed.is_empty() && self.prefix.is_none() {
            return Err("--prefixed needs --prefix".into());
        }
        if let Some(p) = &self.prefix {
            ObjectId::new(format!("{p}x"))
                .and_then(|id| id.check_new())
                .map_err(|e| format!("prefix {p:?}: {e}"))?;
        }
        Ok(())
    }
}

/// A reference `"Type/Id"`, as a field named in `refs` holds it (alone or in an array), for
/// example `"Method/HPLC-1"`. Anything else is not a reference.
pub fn parse_reference(s: &str) -> Option<(TypeName, ObjectId)> {
    let (ty, id) = s.split_once('/')?;
    Some((TypeName::new(ty).ok()?, ObjectId::new(id).ok()?))
}

/// Why a change from a peer was not taken. Carries the type, for per-type counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this node only sends to that peer (direction send)")]
    SendOnlyPeer { ty: TypeName },
    #[error("type {ty} is not exchanged with that peer")]
    TypeNotExchanged { ty: TypeName },
    #[error("type {ty} is sent to that peer but never taken from it")]
    TypeSendOnly { ty: TypeName },
    #[error("type {ty} is update-only from that peer and this node did not create the object")]
    NotOurs { ty: TypeName },
    #[error("a new {ty} is refused: {detail}")]
    BadId { ty: TypeName, detail: String },
    #[error("{ty}/{id} cannot take its peer's prefix ({detail}), so it is refused")]
    Unprefixable {
        ty: TypeName,
        id: String,
        detail: String,
    },
    #[error(
        "{ty} objects of peer {owner} are its own (prefixed here): this change is by {author}, neither that peer nor this node"
    )]
    NotTheirs {
        ty: TypeName,
        owner: String,
        author: NodeId,
    },
    #[error(
        "the change to an object of type {ty} is signed by {author}, a key revoked when its peer's key was replaced"
    )]
    Revoked { ty: TypeName, author: NodeId },
    #[error("type {ty} is read-only here, owned by peer {owner}; this change is by {author}")]
    ReadOnly {
        ty: TypeName,
        owner: String,
        author: NodeId,
    },
}

impl Refusal {
    /// The rule that refused, in a word (the refusal log and the metrics' label).
    pub fn rule(&self) -> &'static str {
        match self {
            Refusal::SendOnlyPeer { .. } => "send-only-peer",
            Refusal::TypeNotExchanged { .. } => "type-not-exchanged",
            Refusal::TypeSendOnly { .. } => "type-send-only",
            Refusal::NotOurs { .. } => "update-only",
            Refusal::Revoked { .. } => "revoked",
            Refusal::Unprefixable { .. } => "unprefixable",
            Refusal::BadId { .. } => "bad-id",
            Refusal::NotTheirs { .. } => "not-theirs",
            Refusal::ReadOnly { .. } => "read-only",
        }
    }

    pub fn ty(&self) -> &TypeName {
        match self {
            Refusal::SendOnlyPeer { ty }
            | Refusal::TypeNotExchanged { ty }
            | Refusal::TypeSendOnly { ty }
            | Refusal::NotOurs { ty }
            | Refusal::Revoked { ty, .. }
            | Refusal::Unprefixable { ty, .. }
            | Refusal::BadId { ty, .. }
            | Refusal::NotTheirs { ty, .. }
            | Refusal::ReadOnly { ty, .. } => ty,
        }
    }
}

/// A local write refused by policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{ty} is read-only on this node: its objects come from peer {owner} and only it may change them"
)]
pub struct ReadOnlyType {
    pub ty: TypeName,
    pub owner: String,
}

/// The policies of all configured peers, by node id, with their names.
#[derive(Debug, Clone)]
pub struct Policies {
    me: NodeId,
    peers: BTreeMap<NodeId, (String, Policy)>,
    /// Keys replaced under their peer's name: nothing new they sign is taken.
    revoked: std::collections::BTreeSet<NodeId>,
    /// The policy of a peer that has none configured: everything, both ways.
    default: Policy,
    /// The faults switched on (see [`crate::fault::Faults::ignore_own_policy`] and
    /// [`crate::fault::Faults::ignore_skip`]); all off outside tests and simulations.
    faults: crate::fault::Faults,
}

impl Policies {
    pub fn new(me: NodeId) -> Policies {
        Policies {
            me,
            peers: BTreeMap::new(),
            revoked: Default::default(),
            default: Policy::default(),
            faults: crate::fault::Faults::default(),
        }
    }

    /// Take the faults switched on in the replica (see [`crate::fault`]).
    pub(crate) fn set_faults(&mut self, faults: crate::fault::Faults) {
        self.faults = faults;
    }

    /// Whether `policy` exchanges `ty` at all ([`Policy::covers`], unless a fault is on).
    fn covers(&self, policy: &Policy, ty: &TypeName) -> bool {
        if self.faults.ignore_skip {
            return policy.types.is_empty() || policy.types.contains(ty);
        }
        policy.covers(ty)
    }

    /// Whether `policy` carries `ty` by reference ([`Policy::carries`], unless a fault is on).
    fn carries(&self, policy: &Policy, ty: &TypeName) -> bool {
        if self.faults.ignore_skip {
            return policy.refs.values().flatten().any(|r| r.target == *ty);
        }
        policy.carries(ty)
    }

    /// Set one peer's policy.
    pub fn set(&mut self, peer: NodeId, name: String, policy: Policy) {
        self.peers.insert(peer, (name, policy));
    }

    /// Revoke `key`: nothing new it signs is taken (see [`Refusal::Revoked`]).
    pub fn revoke(&mut self, key: NodeId) {
        self.revoked.insert(key);
    }

    /// `key` is configured again: it is no longer revoked.
    pub fn unrevoke(&mut self, key: &NodeId) {
        self.revoked.remove(key);
    }

    /// Take the revoked keys the store keeps.
    pub fn set_revoked(&mut self, keys: impl IntoIterator<Item = NodeId>) {
        self.revoked = keys.into_iter().collect();
    }

    /// Whether `key` was revoked by a replacement.
    pub fn is_revoked(&self, key: &NodeId) -> bool {
        self.revoked.contains(key)
    }

    /// The name of `peer`, if it is configured.
    pub fn name_of(&self, peer: &NodeId) -> Option<&str> {
        self.peers.get(peer).map(|(name, _)| name.as_str())
    }

    /// The configured peers, in key order.
    pub fn ids(&self) -> impl Iterator<Item = &NodeId> {
        self.peers.keys()
    }

    /// The configured peer called `name`.
    pub fn named(&self, name: &str) -> Option<NodeId> {
        self.peers
            .iter()
            .find(|(_, (n, _))| n == name)
            .map(|(id, _)| *id)
    }

    pub fn remove(&mut self, peer: &NodeId) {
        self.peers.remove(peer);
    }

    /// The policy for `peer` (the default, everything both ways, for an unknown one).
    pub fn of(&self, peer: &NodeId) -> &Policy {
        self.peers
            .get(peer)
            .map(|(_, p)| p)
            .unwrap_or(&self.default)
    }

    /// Whether this node may send `to` the changes of the document `rec`; `by_ref` when an
    /// object sent to that peer references it (see [`Policy::refs`]).
    pub fn may_send(&self, to: &NodeId, rec: &DocRecord, by_ref: bool) -> bool {
        if self.faults.ignore_own_policy {
            return true;
        }
        let policy = self.of(to);
        if policy.direction == Direction::Receive
            || !(by_ref && self.carries(policy, &rec.ty) || self.covers(policy, &rec.ty))
            || policy.fields.contains_key(&rec.ty)
        {
            // A type published as a view never goes out as the object itself.
            return false;
        }
        // An object that arrived under another peer's prefix is that peer's own: it goes back
        // to its origin and to nobody else.
        if rec.origin != *to
            && let Some((_, origin)) = self.peers.get(&rec.origin)
            && origin.prefixed.contains(&rec.ty)
        {
            return false;
        }
        true
    }

    /// Whether this node takes, from peer `from`, a change by `author` to a document of type
    /// `ty` created by `origin`; `by_ref` when an object from that peer references the
    /// document (see [`Policy::refs`]).
    pub fn may_take(
        &self,
        from: &NodeId,
        ty: &TypeName,
        origin: &NodeId,
        author: &NodeId,
        by_ref: bool,
    ) -> Result<(), Refusal> {
        let policy = self.of(from);
        let ty_owned = || ty.clone();
        if ty.as_str() == tidesync_proto::fleet::STATUS_TYPE {
            // Status records never travel as objects (see `tidesync_proto::fleet`).
            return Err(Refusal::TypeNotExchanged { ty: ty_owned() });
        }
        if self.revoked.contains(author) {
            return Err(Refusal::Revoked {
                ty: ty_owned(),
                author: *author,
            });
        }
        if policy.direction == Direction::Send {
            return Err(Refusal::SendOnlyPeer { ty: ty_owned() });
        }
        if !(by_ref && self.carries(policy, ty) || self.covers(policy, ty)) {
            return Err(Refusal::TypeNotExchanged { ty: ty_owned() });
        }
        if policy.send_only.contains(ty) || policy.fields.contains_key(ty) {
            return Err(Refusal::TypeSendOnly { ty: ty_owned() });
        }
        if policy.update_only.contains(ty) && *origin != self.me {
            return Err(Refusal::NotOurs { ty: ty_owned() });
        }
        // A prefixed peer's objects are its own: only it and this node change them, whoever
        // relays the change.
        if let Some((owner, p)) = self.peers.get(origin)
            && p.prefixed.contains(ty)
            && *author != *origin
            && *author != self.me
        {
            return Err(Refusal::NotTheirs {
                ty: ty_owned(),
                owner: owner.clone(),
                author: *author,
            });
        }
        let owners: Vec<(&NodeId, &String)> = self
            .peers
            .iter()
            .filter(|(_, (_, p))| p.read_only.contains(ty))
            .map(|(id, (name, _))| (id, name))
            .collect();
        if !owners.is_empty() && !owners.iter().any(|(id, _)| *id == from && *id == author) {
            return Err(Refusal::ReadOnly {
                ty: ty_owned(),
                owner: owners
                    .iter()
                    .map(|(_, n)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                author: *author,
            });
        }
        Ok(())
    }

    /// Whether a local write to an object of `ty` is allowed.
    pub fn may_write(&self, ty: &TypeName) -> Result<(), ReadOnlyType> {
        if self.faults.ignore_own_policy {
            return Ok(());
        }
        match self.peers.values().find(|(_, p)| p.read_only.contains(ty)) {
            Some((owner, _)) => Err(ReadOnlyType {
                ty: ty.clone(),
                owner: owner.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The local name of the new object `ty/id` created by `origin`: names follow the node
    /// that created an object, not the peer that relayed it (see [`Policy::local_name`]).
    pub fn local_name(
        &self,
        origin: &NodeId,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<ObjectId, Refusal> {
        self.of(origin).local_name(ty, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TypeName {
        TypeName::new(s).unwrap()
    }
    fn n(b: u8) -> NodeId {
        NodeId([b; 32])
    }
    fn rec(origin: NodeId, ty: &str) -> DocRecord {
        DocRecord {
            origin,
            ty: t(ty),
            id: ObjectId::new("X-1").unwrap(),
            local_id: ObjectId::new("X-1").unwrap(),
            live: true,
        }
    }

    #[test]
    fn direction_types_and_skip_hold_both_ways() {
        let (me, a) = (n(1), n(2));
        let mut p = Policies::new(me);
        p.set(
            a,
            "a".into(),
            Policy {
                types: vec![t("Sample"), t("Method")],
                skip: vec![t("Method")],
                ..Policy::default()
            },
        );
        assert!(p.may_send(&a, &rec(me, "Sample"), false));
        assert!(
            !p.may_send(&a, &rec(me, "Method"), false),
            "skip wins over types"
        );
        assert!(!p.may_send(&a, &rec(me, "Invoice"), false), "not in types");
        assert!(p.may_take(&a, &t("Sample"), &a, &a, false).is_ok());
        assert!(p.may_take(&a, &t("Invoice"), &a, &a, false).is_err());
        p.set(
            a,
            "a".into(),
            Policy {
                direction: Direction::Receive,
                ..Policy::default()
            },
        );
        assert!(!p.may_send(&a, &rec(me, "Sample"), false));
        assert!(p.may_take(&a, &t("Sample"), &a, &a, false).is_ok());
        p.set(
            a,
            "a".into(),
            Policy {
                direction: Direction::Send,
                ..Policy::default()
            },
        );
        assert!(p.may_send(&a, &rec(me, "Sample"), false));
        assert!(matches!(
            p.may_take(&a, &t("Sample"), &a, &a, false),
            Err(Refusal::SendOnlyPeer { .. })
        ));
    }

    #[test]
    fn read_only_types_come_from_their_owner_alone() {
        let (me, hub, lab) = (n(1), n(2), n(3));
        let mut p = Policies::new(me);
        p.set(
            hub,
            "hub".into(),
            Policy {
                read_only: vec![t("Method")],
                ..Policy::default()
            },
        );
        p.set(lab, "lab".into(), Policy::default());
        assert!(p.may_take(&hub, &t("Method"), &hub, &hub, false).is_ok());
        // Relayed by the owner but written by someone else, or sent by someone else.
        assert!(p.may_take(&hub, &t("Method"), &hub, &lab, false).is_err());
        assert!(p.may_take(&lab, &t("Method"), &hub, &lab, false).is_err());
        assert!(p.may_write(&t("Method")).is_err());
        assert!(p.may_write(&t("Sample")).is_ok());
    }

    #[test]
    fn update_only_takes_changes_to_our_own_objects() {
        let (me, a) = (n(1), n(2));
        let mut p = Policies::new(me);
        p.set(
            a,
            "a".into(),
            Policy {
                update_only: vec![t("Sample")],
                ..Policy::default()
            },
        );
        assert!(p.may_take(&a, &t("Sample"), &me, &a, false).is_ok());
        assert!(matches!(
            p.may_take(&a, &t("Sample"), &a, &a, false),
            Err(Refusal::NotOurs { .. })
        ));
    }

    #[test]
    fn prefixed_objects_go_back_to_their_origin_only() {
        let (me, a, b) = (n(1), n(2), n(3));
        let prefixed = |pre: &str| Policy {
            prefix: Some(pre.into()),
            prefixed: vec![t("Sample")],
            ..Policy::default()
        };
        let mut p = Policies::new(me);
        p.set(a, "a".into(), prefixed("A_"));
        p.set(b, "b".into(), prefixed("B_"));
        let id = ObjectId::new("S-001").unwrap();
        assert_eq!(
            p.local_name(&a, &t("Sample"), &id).unwrap().as_str(),
            "A_S-001"
        );
        assert_eq!(
            p.local_name(&a, &t("Department"), &id).unwrap().as_str(),
            "S-001"
        );
        // Regression: an id too long to take the prefix silently kept its raw name, so lab
        // B's object appeared in lab A's `A_` namespace. It is refused.
        let long = ObjectId::new("S".repeat(tidesync_proto::ids::MAX_OBJECT_ID_BYTES)).unwrap();
        assert!(matches!(
            p.local_name(&a, &t("Sample"), &long),
            Err(Refusal::Unprefixable { .. })
        ));
        // Regression: any peer's change to lab A's prefixed objects was taken and relayed
        // back to A. Only A and this node may change them, whoever relays the change.
        assert!(p.may_take(&b, &t("Sample"), &a, &a, false).is_ok());
        assert!(p.may_take(&a, &t("Sample"), &a, &me, false).is_ok());
        assert!(matches!(
            p.may_take(&b, &t("Sample"), &a, &b, false),
            Err(Refusal::NotTheirs { .. })
        ));
        assert!(matches!(
            p.may_take(&a, &t("Sample"), &a, &b, false),
            Err(Refusal::NotTheirs { .. })
        ));
        assert!(p.may_send(&a, &rec(a, "Sample"), false));
        assert!(!p.may_send(&b, &rec(a, "Sample"), false));
        assert!(p.may_send(&b, &rec(a, "Department"), false));
        assert!(
            p.may_send(&b, &rec(me, "Sample"), false),
            "our own samples are not A's"
        );
    }

    #[test]
    fn widening_is_noticed_and_narrowing_is_not() {
        let old = Policy {
            skip: vec![t("Invoice")],
            ..Policy::default()
        };
        assert!(!Policy::default().is_within(&old), "dropping a skip widens");
        let narrower = Policy {
            skip: vec![t("Invoice"), t("User")],
            ..Policy::default()
        };
        assert!(narrower.is_within(&old));
        let typed = Policy {
            types: vec![t("Sample")],
            ..Policy::default()
        };
        assert!(typed.is_within(&Policy::default()));
        assert!(!Policy::default().is_within(&typed));
        let recv = Policy {
            direction: Direction::Receive,
            ..Policy::default()
        };
        assert!(recv.is_within(&Policy::default()));
        assert!(!Policy::default().is_within(&recv));
    }

    fn refs(ty: &str, named: &[&str]) -> (TypeName, Vec<RefField>) {
        (
            t(ty),
            named
                .iter()
                .map(|r| RefField::try_from(r.to_string()).unwrap())
                .collect(),
        )
    }

    // Regression: `--refs` carried any type a reference field named, past the receiver's
    // `--types` and `--skip`, so whoever could edit a reference field chose which objects of
    // any type left the node, and a hub stored a lab's skipped `Invoice`. References now
    // name their target type and `skip` always wins, at both ends.
    #[test]
    fn refs_carry_only_their_target_types_past_types_and_never_past_skip() {
        let (me, a) = (n(1), n(2));
        let mut p = Policies::new(me);
        let policy = Policy {
            types: vec![t("Volume")],
            skip: vec![t("Invoice")],
            refs: BTreeMap::from([refs(
                "Volume",
                &["label_trees:LabelTree", "owner:User", "bill:Invoice"],
            )]),
            ..Policy::default()
        };
        let fields = serde_json::json!({
            "label_trees": ["LabelTree/LT-1", "not a reference", 7, "Secret/S-1"],
            "owner": "User/u-9",
            "bill": "Invoice/I-1",
            "name": "Sample/S-1",
        });
        let found = policy.references(&t("Volume"), fields.as_object().unwrap());
        assert_eq!(
            found,
            vec![
                (t("LabelTree"), ObjectId::new("LT-1").unwrap()),
                (t("User"), ObjectId::new("u-9").unwrap()),
            ],
            "only the named fields, only their target types, never a skipped type"
        );
        assert!(policy.carries(&t("User")));
        assert!(!policy.carries(&t("Invoice")), "skip wins");
        assert!(!policy.carries(&t("Secret")), "not a target");
        p.set(a, "a".into(), policy.clone());
        assert!(!p.may_send(&a, &rec(me, "User"), false));
        assert!(
            p.may_send(&a, &rec(me, "User"), true),
            "a reference passes types"
        );
        assert!(!p.may_send(&a, &rec(me, "Invoice"), true));
        assert!(!p.may_send(&a, &rec(me, "Secret"), true));
        assert!(p.may_take(&a, &t("LabelTree"), &a, &a, true).is_ok());
        assert!(p.may_take(&a, &t("LabelTree"), &a, &a, false).is_err());
        assert!(p.may_take(&a, &t("Invoice"), &a, &a, true).is_err());
        assert!(p.may_take(&a, &t("Secret"), &a, &a, true).is_err());
        let receive_only = Policy {
            direction: Direction::Receive,
            ..policy.clone()
        };
        p.set(a, "a".into(), receive_only);
        assert!(
            !p.may_send(&a, &rec(me, "User"), true),
            "nothing is sent to a receive-only peer"
        );
        // Narrowing ends the carrying: without the field, a carried User no longer passes.
        let narrower = Policy {
            refs: BTreeMap::from([refs("Volume", &["label_trees:LabelTree"])]),
            ..policy.clone()
        };
        p.set(a, "a".into(), narrower.clone());
        assert!(!p.may_send(&a, &rec(me, "User"), true));
        assert!(p.may_take(&a, &t("User"), &a, &a, true).is_err());
        // More reference fields widen a policy; fewer do not.
        assert!(!policy.is_within(&narrower));
        assert!(narrower.is_within(&policy));
        // A field without a target type is refused with the new form.
        let err = RefField::try_from("owner".to_string()).unwrap_err();
        assert!(err.contains("owner:User"), "{err}");
    }

    #[test]
    fn fields_publish_a_view_and_never_the_object() {
        let (me, a) = (n(1), n(2));
        let mut p = Policies::new(me);
        let policy = Policy {
            fields: BTreeMap::from([(t("Entity"), vec!["title".into()])]),
            ..Policy::default()
        };
        p.set(a, "a".into(), policy.clone());
        let obj = serde_json::json!({"title": "T", "secret": "S"});
        assert_eq!(
            policy.view(&t("Entity"), obj.as_object().unwrap()),
            Some(
                serde_json::json!({"title": "T"})
                    .as_object()
                    .unwrap()
                    .clone()
            )
        );
        assert_eq!(policy.view(&t("Sample"), obj.as_object().unwrap()), None);
        assert!(!p.may_send(&a, &rec(me, "Entity"), false));
        assert!(
            !p.may_send(&a, &rec(me, "Entity"), true),
            "not even by reference"
        );
        assert!(p.may_send(&a, &rec(me, "Sample"), false));
        assert!(
            p.may_take(&a, &t("Entity"), &a, &a, false).is_err(),
            "one way"
        );
        // Publishing more fields, or dropping the restriction, widens; fewer fields do not.
        let mut more = policy.clone();
        more.fields
            .insert(t("Entity"), vec!["title".into(), "date".into()]);
        assert!(!more.is_within(&policy));
        assert!(policy.is_within(&more));
        assert!(!Policy::default().is_within(&policy));
    }
}
