//! Identifiers: node ids, document ids, type and object names, and actor ids derived from keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest object id accepted, in bytes of UTF-8.
pub const MAX_OBJECT_ID_BYTES: usize = 256;
/// Longest type name accepted, in bytes.
pub const MAX_TYPE_NAME_BYTES: usize = 64;
/// Length of an Automerge actor id made by [`actor_id`]: 32 key bytes and an 8-byte epoch.
pub const ACTOR_ID_BYTES: usize = 40;

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "invalid type name {0:?}: use 1 to {MAX_TYPE_NAME_BYTES} ASCII letters, digits or '_', starting with a letter"
    )]
    TypeName(String),
    #[error(
        "invalid object id {0:?}: use 1 to {MAX_OBJECT_ID_BYTES} bytes with no '/' and no control characters"
    )]
    ObjectId(String),
    #[error(
        "object id {0:?} cannot name a new object: '~' is kept for the names of colliding objects, and bidi controls and invisible (default-ignorable) characters are refused"
    )]
    NotNew(String),
    #[error("invalid node id {0:?}: expected a libp2p PeerId of an ed25519 key (12D3KooW...)")]
    NodeId(String),
    #[error("invalid document id {0:?}: expected 32 hex digits")]
    DocId(String),
}

/// A node's identity: its ed25519 public key. Displayed as the libp2p PeerId of that key, so the
/// id users see in `tidesync id` is the one libp2p authenticates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The libp2p PeerId of this key, or `None` if the bytes are not a valid ed25519 point.
    pub fn to_peer_id(&self) -> Option<libp2p_identity::PeerId> {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0).ok()?;
        Some(libp2p_identity::PublicKey::from(key).to_peer_id())
    }

    /// The node id behind a PeerId, if that PeerId carries an ed25519 key inline.
    pub fn from_peer_id(peer: &libp2p_identity::PeerId) -> Option<NodeId> {
        let multihash = peer.as_ref();
        // Identity multihash (code 0) of the protobuf-encoded public key.
        if multihash.code() != 0 {
            return None;
        }
        let key = libp2p_identity::PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
        let ed = key.try_into_ed25519().ok()?;
        Some(NodeId(ed.to_bytes()))
    }

    /// The node id that authored an actor made by [`actor_id`], if the actor has that shape.
    pub fn from_actor(actor: &[u8]) -> Option<NodeId> {
        if actor.len() != ACTOR_ID_BYTES {
            return None;
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&actor[..32]);
        Some(NodeId(key))
    }

    /// A short form for logs: the last 8 characters of the PeerId.
    /// What two operators read to each other to check a key: SHA-256 of the 32-byte public
    /// key, its first 10 bytes as five groups of four hex digits (`3f2a-91c0-…`).
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0);
        digest[..10]
            .chunks(2)
            .map(hex::encode)
            .collect::<Vec<_>>()
            .join("-")
    }

    pub fn short(&self) -> String {
        let s = self.to_string();
        s[s.len().saturating_sub(8)..].to_string()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_peer_id() {
            Some(peer) => write!(f, "{peer}"),
            None => write!(f, "invalid-key-{}", hex::encode(self.0)),
        }
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let peer: libp2p_identity::PeerId =
            s.parse().map_err(|_| IdError::NodeId(s.to_string()))?;
        NodeId::from_peer_id(&peer).ok_or_else(|| IdError::NodeId(s.to_string()))
    }
}

/// The Automerge actor id for changes a node makes during one epoch: the node's 32-byte public
/// key followed by the epoch as 8 big-endian bytes. A node picks a fresh random epoch every time
/// it starts, so a node restored from a backup never reuses an (actor, seq) it already published.
pub fn actor_id(node: &NodeId, epoch: u64) -> Vec<u8> {
    let mut actor = Vec::with_capacity(ACTOR_ID_BYTES);
    actor.extend_from_slice(&node.0);
    actor.extend_from_slice(&epoch.to_be_bytes());
    actor
}

/// A document's global identity, the same on every node whatever name it has locally:
/// the first 16 bytes of SHA-256 over the origin node's key, the type and the origin's id.
/// Two nodes that both create `Sample/S-001` make two different documents.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DocId(pub [u8; 16]);

impl DocId {
    /// The id of the document that `origin` creates for `(ty, id)`.
    pub fn derive(origin: &NodeId, ty: &TypeName, id: &ObjectId) -> DocId {
        DocId::hashed(b"tidesync/doc/v1\0", &[&origin.0], ty, id)
    }

    /// The id of the view of `(ty, id)` that `publisher` writes for `peer` alone (see `fields`
    /// in a node's policy): its own derivation domain, so a view never shares a DocId with
    /// the object it shows, nor with the view another peer gets.
    pub fn derive_view(publisher: &NodeId, peer: &NodeId, ty: &TypeName, id: &ObjectId) -> DocId {
        DocId::hashed(b"tidesync/view/v1\0", &[&publisher.0, &peer.0], ty, id)
    }

    /// The first 16 bytes of SHA-256 over `domain`, the `keys`, the type, a zero byte and the id.
    fn hashed(domain: &[u8], keys: &[&[u8; 32]], ty: &TypeName, id: &ObjectId) -> DocId {
        let mut h = Sha256::new();
        h.update(domain);
        for key in keys {
            h.update(key);
        }
        h.update(ty.as_str().as_bytes());
        h.update([0u8]);
        h.update(id.as_str().as_bytes());
        let digest = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        DocId(out)
    }

    /// Whether `header` names its document truly for a receiver `me`: `doc` is the id of the
    /// object `(origin, ty, id)` or of the view of it that `origin` writes for `me`.
    pub fn names(
        header_doc: &DocId,
        origin: &NodeId,
        me: &NodeId,
        ty: &TypeName,
        id: &ObjectId,
    ) -> bool {
        *header_doc == DocId::derive(origin, ty, id)
            || *header_doc == DocId::derive_view(origin, me, ty, id)
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({self})")
    }
}

impl FromStr for DocId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|_| IdError::DocId(s.to_string()))?;
        Ok(DocId(out))
    }
}

/// A type name such as `Sample` or `LabelTree`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TypeName(String);

impl TypeName {
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_TYPE_NAME_BYTES
            && s.as_bytes()[0].is_ascii_alphabetic()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok {
            Ok(TypeName(s))
        } else {
            Err(IdError::TypeName(s))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An object's id within its type, such as `S-001`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ObjectId(String);

impl ObjectId {
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_OBJECT_ID_BYTES
            && !s.chars().any(|c| c == '/' || c.is_control());
        if ok {
            Ok(ObjectId(s))
        } else {
            Err(IdError::ObjectId(s))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Check that this id may name a new object, created here or by a peer: it holds no
    /// [`COLLISION_MARK`] (so the names given to colliding objects cannot be claimed in
    /// advance), no bidi control and no default-ignorable code point (which would make two
    /// names look alike).
    pub fn check_new(&self) -> Result<(), IdError> {
        if self
            .0
            .chars()
            .any(|c| c == COLLISION_MARK || is_default_ignorable(c))
        {
            return Err(IdError::NotNew(self.0.clone()));
        }
        Ok(())
    }
}

/// The mark between a colliding object's name and its document id in the local name it gets
/// (`S-001~<document id>`); refused in the id of any new object (see [`ObjectId::check_new`]).
pub const COLLISION_MARK: char = '~';

/// Whether `c` is a bidi control or a default-ignorable code point (Unicode's
/// `Default_Ignorable_Code_Point`, which holds every bidi control but U+061C).
pub fn is_default_ignorable(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x034F
            | 0x061C
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x206F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFF8
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    )
}

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                <$t>::new(s)
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                <$t>::new(s)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_newtype_impls!(TypeName);
string_newtype_impls!(ObjectId);

#[cfg(test)]
mod tests {
    use super::*;

    fn node(b: u8) -> NodeId {
        let key = ed25519_dalek::SigningKey::from_bytes(&[b; 32]);
        NodeId(key.verifying_key().to_bytes())
    }

    #[test]
    fn node_id_round_trips_through_peer_id_text() {
        let n = node(7);
        let text = n.to_string();
        assert!(text.starts_with("12D3KooW"), "{text}");
        assert_eq!(text.parse::<NodeId>().unwrap(), n);
        assert!("not-a-peer".parse::<NodeId>().is_err());
    }

    #[test]
    fn doc_ids_differ_by_origin_type_and_id() {
        let t = TypeName::new("Sample").unwrap();
        let i = ObjectId::new("S-001").unwrap();
        let a = DocId::derive(&node(1), &t, &i);
        assert_eq!(a, DocId::derive(&node(1), &t, &i));
        assert_ne!(a, DocId::derive(&node(2), &t, &i));
        assert_ne!(
            a,
            DocId::derive(&node(1), &TypeName::new("Method").unwrap(), &i)
        );
        assert_eq!(a.to_string().parse::<DocId>().unwrap(), a);
    }

    #[test]
    fn names_are_validated() {
        assert!(TypeName::new("LabelTree").is_ok());
        for bad in ["", "1abc", "a-b", "a/b", &"x".repeat(65)] {
            assert!(TypeName::new(bad).is_err(), "{bad}");
        }
        assert!(ObjectId::new("S-001 (rerun)").is_ok());
        for bad in ["", "a/b", "a\nb", &"x".repeat(257)] {
            assert!(ObjectId::new(bad).is_err(), "{bad}");
        }
    }

    // Regression: `~` was allowed in ids, so a peer could create `S-001~<hex>` before the
    // collision that would give another document that name; and ids with bidi controls or
    // invisible characters could pass for another object's.
    #[test]
    fn new_objects_cannot_take_collision_names_or_invisible_characters() {
        assert!(ObjectId::new("S-001").unwrap().check_new().is_ok());
        assert!(ObjectId::new("Échantillon 1").unwrap().check_new().is_ok());
        for bad in [
            "S-001~0123abcd",
            "S-\u{202E}100",
            "S\u{200B}-001",
            "S-001\u{2066}",
            "S-001\u{FEFF}",
            "\u{E0041}S",
        ] {
            let id = ObjectId::new(bad).unwrap();
            assert!(matches!(id.check_new(), Err(IdError::NotNew(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_view_has_its_own_id_for_each_peer() {
        let (a, b, c) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
        let (ty, id) = (
            TypeName::new("Entity").unwrap(),
            ObjectId::new("E-1").unwrap(),
        );
        let object = DocId::derive(&a, &ty, &id);
        let (for_b, for_c) = (
            DocId::derive_view(&a, &b, &ty, &id),
            DocId::derive_view(&a, &c, &ty, &id),
        );
        assert!(object != for_b && object != for_c && for_b != for_c);
        assert!(DocId::names(&for_b, &a, &b, &ty, &id));
        assert!(DocId::names(&object, &a, &b, &ty, &id));
        assert!(
            !DocId::names(&for_c, &a, &b, &ty, &id),
            "another peer's view"
        );
    }

    #[test]
    fn actor_ids_carry_their_author() {
        let n = node(3);
        let a = actor_id(&n, 42);
        assert_eq!(a.len(), ACTOR_ID_BYTES);
        assert_eq!(NodeId::from_actor(&a), Some(n));
        assert_eq!(NodeId::from_actor(&a[..39]), None);
    }
}
