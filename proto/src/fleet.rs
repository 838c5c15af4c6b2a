//! A node's signed status record, which it sends its direct peers so that a hub can show its
//! whole fleet (`tidesync fleet`), offline nodes included, with the age of what it knows.
//!
//! # Format
//! [`SignedStatus`] travels in [`crate::wire::Message::Status`]: `record` is the postcard
//! encoding of a [`StatusRecord`] (at most [`MAX_STATUS_RECORD_BYTES`]), `signature` the
//! ed25519 signature by `record.node`'s key over [`STATUS_SIGNING_DOMAIN`] ‖ `record`. A newer
//! record (by `made_ms`) replaces the one kept; nothing else of it is kept.

use ed25519_dalek::{Signer, SigningKey};
use ed25519_zebra::Signature;
use serde::{Deserialize, Serialize};

use crate::change::AuthorKey;
use crate::ids::NodeId;

/// The reserved type status records travel under: no object may have it, and a policy that
/// skips it (`--skip TidesyncStatus`) keeps status records from and to that peer.
pub const STATUS_TYPE: &str = "TidesyncStatus";
/// What a status signature covers before the record's bytes.
pub const STATUS_SIGNING_DOMAIN: &[u8] = b"tidesync/status/v1\0";
/// Largest encoded status record accepted, in bytes.
pub const MAX_STATUS_RECORD_BYTES: usize = 64 * 1024;
/// Most peers one record lists (the rest are counted in `peers_total`).
pub const MAX_STATUS_PEERS: usize = 128;
/// Longest name or version string in a record, in bytes.
pub const MAX_STATUS_TEXT_BYTES: usize = 128;

/// What a node says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub node: NodeId,
    pub name: String,
    /// The tidesync version it runs.
    pub version: String,
    /// When it made the record, Unix milliseconds (by its clock).
    pub made_ms: i64,
    pub store_bytes: u64,
    pub objects: u64,
    pub held_changes: u64,
    /// Changes it refused by policy (its refusal log).
    pub refusals: u64,
    pub files_wanted: u64,
    pub concurrent_fields: u64,
    /// Its configured peers, at most [`MAX_STATUS_PEERS`].
    pub peers: Vec<StatusPeer>,
    pub peers_total: u64,
}

/// One of a node's peers as its status record shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusPeer {
    pub name: String,
    pub id: NodeId,
    pub connected: bool,
    pub last_sync_ms: Option<i64>,
    /// Its log entries the peer has not acknowledged, and the peer's not yet here.
    pub lag_out: u64,
    pub lag_in: u64,
    pub held: u64,
    pub refused: u64,
}

/// A status record and its author's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStatus {
    #[serde(with = "crate::change::serde_bytes_vec")]
    pub record: Vec<u8>,
    #[serde(with = "crate::change::serde_bytes_vec")]
    pub signature: Vec<u8>,
}

/// Why a status record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("status record of {len} bytes exceeds the limit of {MAX_STATUS_RECORD_BYTES} bytes")]
    TooLarge { len: usize },
    #[error("status record is malformed: {0}")]
    Malformed(String),
    #[error("status record of {node} does not carry that node's valid signature")]
    BadSignature { node: NodeId },
}

fn signing_input(record: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(STATUS_SIGNING_DOMAIN.len() + record.len());
    msg.extend_from_slice(STATUS_SIGNING_DOMAIN);
    msg.extend_from_slice(record);
    msg
}

/// Cut a string to at most [`MAX_STATUS_TEXT_BYTES`], on a character boundary.
pub fn bounded_text(s: &str) -> String {
    let mut end = s.len().min(MAX_STATUS_TEXT_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl SignedStatus {
    /// Sign `record` with `key` (the key of `record.node`).
    pub fn sign(key: &SigningKey, record: &StatusRecord) -> Result<SignedStatus, StatusError> {
        let bytes =
            postcard::to_stdvec(record).map_err(|e| StatusError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_STATUS_RECORD_BYTES {
            return Err(StatusError::TooLarge { len: bytes.len() });
        }
        let signature = key.sign(&signing_input(&bytes)).to_bytes().to_vec();
        Ok(SignedStatus {
            record: bytes,
            signature,
        })
    }

    /// The record, once its size, its form, its strings' lengths and its author's signature
    /// are checked.
    pub fn verify(&self) -> Result<StatusRecord, StatusError> {
        if self.record.len() > MAX_STATUS_RECORD_BYTES {
            return Err(StatusError::TooLarge {
                len: self.record.len(),
            });
        }
        let record: StatusRecord = postcard::from_bytes(&self.record)
            .map_err(|e| StatusError::Malformed(e.to_string()))?;
        if record.peers.len() > MAX_STATUS_PEERS
            || std::iter::once(&record.name)
                .chain([&record.version])
                .chain(record.peers.iter().map(|p| &p.name))
                .any(|s| s.len() > MAX_STATUS_TEXT_BYTES)
        {
            return Err(StatusError::Malformed("over its limits".into()));
        }
        let bad = || StatusError::BadSignature { node: record.node };
        let key = AuthorKey::new(&record.node).ok_or_else(bad)?;
        let signature: [u8; 64] = self.signature.as_slice().try_into().map_err(|_| bad())?;
        key.verify(
            &Signature::from_bytes(&signature),
            &signing_input(&self.record),
        )
        .then_some(())
        .ok_or_else(bad)?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &SigningKey) -> StatusRecord {
        StatusRecord {
            node: NodeId(key.verifying_key().to_bytes()),
            name: "ship".into(),
            version: "0.1.0".into(),
            made_ms: 5,
            store_bytes: 1,
            objects: 2,
            held_changes: 0,
            refusals: 0,
            files_wanted: 3,
            concurrent_fields: 0,
            peers: vec![],
            peers_total: 0,
        }
    }

    #[test]
    fn a_signed_record_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let signed = SignedStatus::sign(&key, &record(&key)).unwrap();
        assert_eq!(signed.verify().unwrap(), record(&key));
        let mut forged = signed.clone();
        let last = forged.record.len() - 1;
        forged.record[last] ^= 1;
        assert!(forged.verify().is_err());
        // Another key cannot speak for the node.
        let other = SigningKey::from_bytes(&[8; 32]);
        let mut lie = SignedStatus::sign(&other, &record(&key)).unwrap();
        assert!(matches!(
            lie.verify(),
            Err(StatusError::BadSignature { .. })
        ));
        lie.signature.truncate(10);
        assert!(lie.verify().is_err());
        let huge = SignedStatus {
            record: vec![0; MAX_STATUS_RECORD_BYTES + 1],
            signature: vec![],
        };
        assert!(matches!(huge.verify(), Err(StatusError::TooLarge { .. })));
    }

    #[test]
    fn text_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_STATUS_TEXT_BYTES);
        let cut = bounded_text(&long);
        assert!(cut.len() <= MAX_STATUS_TEXT_BYTES && cut.chars().all(|c| c == 'é'));
    }
}
