//! The signed change envelope: an Automerge change, the document it belongs to, and its author's
//! ed25519 signature, with signing and verification.
//!
//! Wire and disk format (postcard): `SignedChange { doc: [u8; 16], bytes: <automerge change>,
//! signature: [u8; 64] }`. The signature covers [`SIGNING_DOMAIN`] ‖ doc id ‖ change hash, so a
//! change can be neither altered nor replayed into another document. The author is not carried
//! separately: it is the key inside the change's Automerge actor id (see [`crate::ids::actor_id`]),
//! so a relay cannot re-attribute a change without the signature check failing.

use std::collections::HashMap;

use automerge::{Change, ChangeHash};
use ed25519_dalek::{Signer, SigningKey};
use ed25519_zebra::{Signature, VerificationKey, VerificationKeyBytes, batch};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChangeHeader, ChunkError};
use crate::ids::{DocId, NodeId};

/// Domain separator prefixed to every signed message.
pub const SIGNING_DOMAIN: &[u8] = b"tidesync/change/v1\0";

/// A change as it is stored and sent: raw Automerge change bytes plus the author's signature.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedChange {
    /// The document this change belongs to.
    pub doc: DocId,
    /// The Automerge change in its binary encoding.
    #[serde(with = "serde_bytes_vec")]
    pub bytes: Vec<u8>,
    /// ed25519 signature by the actor's key over [`signing_message`].
    #[serde(with = "serde_bytes_64")]
    pub signature: [u8; 64],
}

impl std::fmt::Debug for SignedChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedChange")
            .field("doc", &self.doc)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// A change whose author, hash and document binding have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedChange {
    pub doc: DocId,
    pub author: NodeId,
    pub hash: ChangeHash,
    pub change: Change,
}

/// Why a change failed verification. Each variant names the document it claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("change for document {doc} is not a valid Automerge change: {reason}")]
    Malformed { doc: DocId, reason: String },
    #[error("change {hash} for document {doc} has actor {actor} which is not a tidesync node key")]
    ForeignActor {
        doc: DocId,
        hash: String,
        actor: String,
    },
    #[error(
        "change {hash} for document {doc} claims author {author} but the signature does not verify"
    )]
    BadSignature {
        doc: DocId,
        hash: String,
        author: NodeId,
    },
}

/// The bytes a change's author signs.
pub fn signing_message(doc: &DocId, hash: &ChangeHash) -> [u8; SIGNING_DOMAIN.len() + 16 + 32] {
    let mut msg = [0u8; SIGNING_DOMAIN.len() + 16 + 32];
    msg[..SIGNING_DOMAIN.len()].copy_from_slice(SIGNING_DOMAIN);
    msg[SIGNING_DOMAIN.len()..SIGNING_DOMAIN.len() + 16].copy_from_slice(&doc.0);
    msg[SIGNING_DOMAIN.len() + 16..].copy_from_slice(&hash.0);
    msg
}

impl SignedChange {
    /// Sign `change` of document `doc` with `key`. The change's actor must be derived from
    /// `key` (see [`crate::ids::actor_id`]) or verification will fail on every node.
    pub fn sign(key: &SigningKey, doc: DocId, change: &Change) -> SignedChange {
        let signature = key.sign(&signing_message(&doc, &change.hash()));
        SignedChange {
            doc,
            bytes: change.raw_bytes().to_vec(),
            signature: signature.to_bytes(),
        }
    }

    /// Decode the change and check that its actor is a node key, and that this key signed this
    /// change's hash for this document. Altering any byte of the change, the document id or the
    /// signature makes this fail.
    pub fn verify(&self) -> Result<VerifiedChange, VerifyError> {
        let decoded = self.decode()?;
        match AuthorKey::new(&decoded.author) {
            Some(key) => decoded.check(&key),
            None => Err(decoded.bad_signature()),
        }
    }

    /// Read the change's header and name its author, without checking the signature yet (see
    /// [`DecodedChange::check`]) and without decoding a single op: the hash and the author come
    /// from our own bounded reader ([`ChangeHeader::parse`]), so hostile bytes cost at most
    /// one pass over [`MAX_CHANGE_BYTES`](crate::chunk::MAX_CHANGE_BYTES). Only an
    /// uncompressed change chunk whose checksum matches its hash is accepted, so what is stored
    /// and relayed is byte for byte what the author signed.
    pub fn decode(&self) -> Result<DecodedChange, VerifyError> {
        let header = ChangeHeader::parse(&self.bytes).map_err(|e| self.malformed(e))?;
        let hash = ChangeHash(header.hash);
        let author =
            NodeId::from_actor(&header.actor).ok_or_else(|| VerifyError::ForeignActor {
                doc: self.doc,
                hash: hash.to_string(),
                actor: hex::encode(&header.actor),
            })?;
        Ok(DecodedChange {
            doc: self.doc,
            author,
            hash,
            header,
            bytes: self.bytes.clone(),
            signature: self.signature,
        })
    }

    fn malformed(&self, e: ChunkError) -> VerifyError {
        VerifyError::Malformed {
            doc: self.doc,
            reason: e.to_string(),
        }
    }
}

/// Parse change bytes with Automerge, after our own bounded reader has checked the header and
/// every op column ([`ChangeHeader::check_ops`]), and under `catch_unwind`: should Automerge
/// still panic on some input, the change is refused instead of the thread dying. This is the
/// only way tidesync hands stored or received change bytes to Automerge.
pub fn parse_change(bytes: Vec<u8>) -> Result<Change, ChunkError> {
    let header = ChangeHeader::parse(&bytes)?;
    header.check_ops(&bytes)?;
    parse_checked(&header, bytes)
}

fn parse_checked(header: &ChangeHeader, bytes: Vec<u8>) -> Result<Change, ChunkError> {
    let parsed = std::panic::catch_unwind(move || Change::from_bytes(bytes))
        .map_err(|_| ChunkError::Malformed("Automerge panicked while decoding the change"))?
        .map_err(|_| ChunkError::Malformed("Automerge refused the change's ops"))?;
    if parsed.hash().0 != header.hash {
        return Err(ChunkError::Malformed("Automerge read another hash"));
    }
    Ok(parsed)
}

/// A change decoded from its envelope whose signature is not checked yet.
#[derive(Debug, Clone)]
pub struct DecodedChange {
    pub doc: DocId,
    pub author: NodeId,
    pub hash: ChangeHash,
    header: ChangeHeader,
    bytes: Vec<u8>,
    signature: [u8; 64],
}

impl DecodedChange {
    fn bad_signature(&self) -> VerifyError {
        VerifyError::BadSignature {
            doc: self.doc,
            hash: self.hash.to_string(),
            author: self.author,
        }
    }

    /// The signature is good: now, and only now, bound the op columns and let Automerge
    /// decode the ops.
    fn verified(self) -> Result<VerifiedChange, VerifyError> {
        let doc = self.doc;
        let malformed = |e: ChunkError| VerifyError::Malformed {
            doc,
            reason: e.to_string(),
        };
        self.header.check_ops(&self.bytes).map_err(malformed)?;
        let change = parse_checked(&self.header, self.bytes).map_err(malformed)?;
        Ok(VerifiedChange {
            doc: self.doc,
            author: self.author,
            hash: self.hash,
            change,
        })
    }

    /// Treat the change as verified without checking its signature. Only a deliberately
    /// broken node does this (the simulations' `accept-unsigned` fault, which must be caught
    /// by their signature invariant); nothing else may call it. It exists only with the
    /// `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn unchecked_for_fault_injection(self) -> Result<VerifiedChange, VerifyError> {
        self.verified()
    }

    fn batch_item(&self, key: &AuthorKey) -> batch::Item {
        let message = signing_message(&self.doc, &self.hash);
        batch::Item::from((
            key.bytes,
            Signature::from_bytes(&self.signature),
            &message[..],
        ))
    }

    /// Check the signature with `key`, which must be the author's, by the rule of
    /// [`AuthorKey`]: the same rule [`check_batch`] applies, so a change is valid or not
    /// whatever batch it arrives in.
    pub fn check(self, key: &AuthorKey) -> Result<VerifiedChange, VerifyError> {
        if key.author != self.author {
            return Err(self.bad_signature());
        }
        match key.key.verify(
            &Signature::from_bytes(&self.signature),
            &signing_message(&self.doc, &self.hash),
        ) {
            Ok(()) => self.verified(),
            Err(_) => Err(self.bad_signature()),
        }
    }
}

/// An author's public key, ready to verify with. Signatures are checked by the ZIP-215 rule
/// (cofactored equation `[8][s]B = [8]R + [8][k]A`, `s < l`), under which verifying a batch
/// at once and verifying each change alone always agree, so every node accepts exactly the
/// same changes. On top of ZIP-215 the key itself must be the canonical encoding of a point
/// that is not of small order: nobody could hold a weak key's secret, so a change claiming
/// one as its author is rejected.
#[derive(Clone)]
pub struct AuthorKey {
    author: NodeId,
    bytes: VerificationKeyBytes,
    key: VerificationKey,
}

impl AuthorKey {
    /// Whether `signature` is this key's over `msg` (the ZIP-215 rule, as for changes).
    pub fn verify(&self, signature: &Signature, msg: &[u8]) -> bool {
        self.key.verify(signature, msg).is_ok()
    }

    /// The key of `author`, or `None` when it is not a usable ed25519 public key.
    pub fn new(author: &NodeId) -> Option<AuthorKey> {
        let dalek = ed25519_dalek::VerifyingKey::from_bytes(&author.0).ok()?;
        if dalek.is_weak() || dalek.to_edwards().compress().to_bytes() != author.0 {
            return None;
        }
        let bytes = VerificationKeyBytes::from(author.0);
        let key = VerificationKey::try_from(bytes).ok()?;
        Some(AuthorKey {
            author: *author,
            bytes,
            key,
        })
    }
}

/// Verify many decoded changes at once; a change that failed to decode keeps its error. `keys`
/// holds each author's key (`None` for an author whose key is unusable). The whole set is
/// checked in one multiscalar multiplication; only when that fails is each change checked
/// alone, to find the bad ones. Every result is what [`DecodedChange::check`] would give for
/// that change.
pub fn check_batch(
    changes: Vec<Result<DecodedChange, VerifyError>>,
    keys: &HashMap<NodeId, Option<AuthorKey>>,
) -> Vec<Result<VerifiedChange, VerifyError>> {
    let key_of = |d: &DecodedChange| keys.get(&d.author).and_then(Option::as_ref);
    let mut batch = batch::Verifier::new();
    for d in changes.iter().flatten() {
        if let Some(key) = key_of(d) {
            batch.queue(d.batch_item(key));
        }
    }
    // Randomness only weights the batch equation; it cannot change which changes pass.
    let batch_ok = batch.verify(rand::rng()).is_ok();
    changes
        .into_iter()
        .map(|d| {
            let d = d?;
            match key_of(&d) {
                Some(_) if batch_ok => d.verified(),
                Some(key) => d.check(key),
                None => Err(d.bad_signature()),
            }
        })
        .collect()
}

/// Serde helper for byte vectors: written as bytes (one length prefix, then the bytes) and read
/// from bytes or a sequence. Use as `#[serde(with = "tidesync_proto::change::serde_bytes_vec")]`.
pub mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Serde helper for 64-byte signatures, written as bytes. Use as
/// `#[serde(with = "tidesync_proto::change::serde_bytes_64")]`.
pub mod serde_bytes_64 {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v = super::serde_bytes_vec::deserialize(d)?;
        v.try_into()
            .map_err(|v: Vec<u8>| serde::de::Error::invalid_length(v.len(), &"64 signature bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ObjectId, TypeName, actor_id};
    use automerge::{Automerge, ROOT, transaction::Transactable};

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    fn make_change(key: &SigningKey) -> (DocId, Change) {
        let node = NodeId(key.verifying_key().to_bytes());
        let doc_id = DocId::derive(
            &node,
            &TypeName::new("Sample").unwrap(),
            &ObjectId::new("S-1").unwrap(),
        );
        let mut doc = Automerge::new().with_actor(actor_id(&node, 9).into());
        let mut tx = doc.transaction();
        tx.put(ROOT, "status", "received").unwrap();
        tx.commit();
        (doc_id, doc.get_last_local_change().unwrap())
    }

    #[test]
    fn signed_change_verifies_and_names_its_author() {
        let k = key(1);
        let (doc, change) = make_change(&k);
        let signed = SignedChange::sign(&k, doc, &change);
        let v = signed.verify().unwrap();
        assert_eq!(v.author.0, k.verifying_key().to_bytes());
        assert_eq!(v.hash, change.hash());
        let bytes = postcard::to_stdvec(&signed).unwrap();
        assert_eq!(
            postcard::from_bytes::<SignedChange>(&bytes).unwrap(),
            signed
        );
    }

    // Regression: a change whose 4-byte checksum field was flipped still verified, because
    // Automerge's `Change::from_bytes` does not insist on the checksum when the body hashes
    // fine. `decode` now requires the checksum to equal the hash's first four bytes.
    #[test]
    fn altered_changes_are_rejected() {
        let k = key(1);
        let (doc, change) = make_change(&k);
        let signed = SignedChange::sign(&k, doc, &change);

        let mut other_doc = signed.clone();
        other_doc.doc.0[0] ^= 1;
        assert!(matches!(
            other_doc.verify(),
            Err(VerifyError::BadSignature { .. })
        ));

        let mut sig = signed.clone();
        sig.signature[5] ^= 1;
        assert!(matches!(
            sig.verify(),
            Err(VerifyError::BadSignature { .. })
        ));

        // Every single-byte flip of the change body is caught (checksum, hash or signature).
        for i in 0..signed.bytes.len() {
            let mut body = signed.clone();
            body.bytes[i] ^= 0x40;
            assert!(body.verify().is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn a_change_signed_by_someone_else_is_rejected() {
        let (doc, change) = make_change(&key(1));
        let forged = SignedChange::sign(&key(2), doc, &change);
        assert!(matches!(
            forged.verify(),
            Err(VerifyError::BadSignature { .. })
        ));
    }

    #[test]
    fn a_batch_agrees_with_one_by_one_and_isolates_the_bad_changes() {
        let keys: Vec<SigningKey> = (1..=3).map(key).collect();
        let mut signed: Vec<SignedChange> = (0..90)
            .map(|i| {
                let k = &keys[i % 3];
                let (doc, change) = make_change(k);
                SignedChange::sign(k, doc, &change)
            })
            .collect();
        // Two forgeries (signed by the wrong key) and one altered signature among them.
        let (doc, change) = make_change(&keys[0]);
        signed[10] = SignedChange::sign(&keys[1], doc, &change);
        signed[50].signature[0] ^= 1;
        signed[77].signature[40] ^= 1;
        let decoded: Vec<_> = signed.iter().map(SignedChange::decode).collect();
        let mut author_keys = HashMap::new();
        for d in decoded.iter().flatten() {
            author_keys
                .entry(d.author)
                .or_insert_with(|| AuthorKey::new(&d.author));
        }
        let batch = check_batch(decoded, &author_keys);
        for (i, (b, s)) in batch.iter().zip(&signed).enumerate() {
            assert_eq!(
                b.is_ok(),
                s.verify().is_ok(),
                "batch and single disagree at {i}"
            );
            assert_eq!(b.is_err(), [10, 50, 77].contains(&i), "change {i}");
        }
    }

    #[test]
    fn a_small_order_or_non_canonical_key_cannot_be_an_author() {
        // The identity point: anyone could "sign" for it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(AuthorKey::new(&NodeId(identity)).is_none());
        // A point of order 2 (y = -1).
        let mut order_two = [0xffu8; 32];
        order_two[0] = 0xec;
        order_two[31] = 0x7f;
        assert!(AuthorKey::new(&NodeId(order_two)).is_none());
        // A real key is fine.
        let real = NodeId(key(4).verifying_key().to_bytes());
        assert!(AuthorKey::new(&real).is_some());
    }
}
