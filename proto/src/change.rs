//! The signed change envelope: an Automerge change, the document it belongs to, and its author's
//! ed25519 signature, with signing and verification.
//!
//! Wire and disk format (postcard): `SignedChange { doc: [u8; 16], bytes: <automerge change>,
//! signature: [u8; 64] }`. The signature covers [`SIGNING_DOMAIN`] ‖ doc id ‖ change hash, so a
//! change can be neither altered nor replayed into another document. The author is not carried
//! separately: it is the key inside the change's Automerge actor id (see [`crate::ids::actor_id`]),
//! so a relay cannot re-attribute a change without the signature check failing.

use automerge::{Change, ChangeHash};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

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
        let key =
            VerifyingKey::from_bytes(&decoded.author.0).map_err(|_| decoded.bad_signature())?;
        decoded.check(&key)
    }

    /// Decode the change and name its author, without checking the signature yet (see
    /// [`DecodedChange::check`]); lets a caller decompress each author's key once per batch.
    pub fn decode(&self) -> Result<DecodedChange, VerifyError> {
        let change =
            Change::from_bytes(self.bytes.clone()).map_err(|e| VerifyError::Malformed {
                doc: self.doc,
                reason: e.to_string(),
            })?;
        let hash = change.hash();
        // An Automerge chunk is magic (4 bytes), checksum (4 bytes, the hash's first 4), body.
        // Automerge does not insist on the checksum when the body hashes fine; we do, so that
        // what is stored and relayed is byte-for-byte what the author produced.
        if self.bytes.get(4..8) != Some(&hash.0[..4]) {
            return Err(VerifyError::Malformed {
                doc: self.doc,
                reason: format!("checksum does not match change hash {hash}"),
            });
        }
        let author = NodeId::from_actor(change.actor_id().to_bytes()).ok_or_else(|| {
            VerifyError::ForeignActor {
                doc: self.doc,
                hash: hash.to_string(),
                actor: change.actor_id().to_hex_string(),
            }
        })?;
        Ok(DecodedChange {
            doc: self.doc,
            author,
            hash,
            change,
            signature: self.signature,
        })
    }
}

/// A change decoded from its envelope whose signature is not checked yet.
#[derive(Debug, Clone)]
pub struct DecodedChange {
    pub doc: DocId,
    pub author: NodeId,
    pub hash: ChangeHash,
    change: Change,
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

    /// Check the signature with `key`, which must be the author's (strict ed25519 rules, the
    /// same on every node, so that nodes never disagree on which changes are valid).
    pub fn check(self, key: &VerifyingKey) -> Result<VerifiedChange, VerifyError> {
        if key.as_bytes() != &self.author.0 {
            return Err(self.bad_signature());
        }
        key.verify_strict(
            &signing_message(&self.doc, &self.hash),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| self.bad_signature())?;
        Ok(VerifiedChange {
            doc: self.doc,
            author: self.author,
            hash: self.hash,
            change: self.change,
        })
    }
}

mod serde_bytes_vec {
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

mod serde_bytes_64 {
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
}
