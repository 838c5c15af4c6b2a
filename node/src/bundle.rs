//! Export bundles: one signed, versioned file of signed changes for one peer, encrypted to that
//! peer's key, carried where no link reaches (a ship's USB stick) and imported like a sync batch.
//!
//! # File format (version 1)
//!
//! | Bytes | What |
//! | --- | --- |
//! | 16 | `BUNDLE_MAGIC`, `tidesync-bundle\0` |
//! | 2 | format version, big-endian (`BUNDLE_FORMAT_VERSION`) |
//! | 1 | flags: bit 0 set when the payload is encrypted |
//! | 32 | the exporter's node key |
//! | 32 | the recipient's node key |
//! | 8 | payload length in bytes, big-endian (at most `MAX_BUNDLE_BYTES`) |
//! | n | payload |
//!
//! The payload is the sealed bundle, or (flag 0 set, the default) its age encryption to the
//! recipient: an X25519 recipient whose key is the recipient's ed25519 node key in Montgomery
//! form, as age's own `ssh-ed25519` recipients derive it. The sealed bundle is the postcard
//! encoding of `Sealed { body, signature }`: `body` is the postcard encoding of [`BundleBody`]
//! and `signature` the exporter's ed25519 signature over `BUNDLE_SIGNING_DOMAIN`, the 91 header
//! bytes and `body`, so nothing in the header or the body can change unnoticed. Every change
//! inside is signed by its own author as on the wire, and is verified again on import.

use std::collections::{HashMap, HashSet};

use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use tidesync_proto::{Checkpoint, DocHeader, DocId, NodeId, SignedChange};

use crate::core::Core;
use crate::identity::Identity;
use crate::model::Claim;
use crate::store::StoreError;
use crate::sync::{SYNC_BATCH_CHANGES, SyncError};

/// The first bytes of every bundle.
pub const BUNDLE_MAGIC: &[u8; 16] = b"tidesync-bundle\0";
/// The bundle format this build writes and reads.
pub const BUNDLE_FORMAT_VERSION: u16 = 1;
/// Bytes of the cleartext header.
pub const BUNDLE_HEADER_BYTES: usize = 16 + 2 + 1 + 32 + 32 + 8;
/// Largest payload a bundle may carry, in bytes; a larger one is refused before it is read.
pub const MAX_BUNDLE_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// What the exporter signs before the header and the body.
pub const BUNDLE_SIGNING_DOMAIN: &[u8] = b"tidesync/bundle/v1\0";
/// Header flag: the payload is encrypted to the recipient.
const FLAG_ENCRYPTED: u8 = 1;

/// What a bundle carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleBody {
    pub from: NodeId,
    pub to: NodeId,
    /// When it was exported, Unix milliseconds.
    pub created_ms: i64,
    /// The exporter's log is carried from after this SEQ (0 for `--all`)...
    pub after: u64,
    /// ... up to this checkpoint: the exporter's frontier when it exported.
    pub upto: Checkpoint,
    /// How far the exporter holds the recipient's log: the receipt that tells the recipient
    /// what need not travel back.
    pub holds: Checkpoint,
    pub docs: Vec<DocHeader>,
    pub changes: Vec<SignedChange>,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    #[serde(with = "tidesync_proto::change::serde_bytes_vec")]
    body: Vec<u8>,
    #[serde(with = "tidesync_proto::change::serde_bytes_64")]
    signature: [u8; 64],
}

/// Why a bundle could not be written or read. Nothing is written by a failed import.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("no peer named {name} is configured; bundles go to configured peers")]
    UnknownPeer { name: String },
    #[error("this is not a tidesync bundle (it does not start with the bundle magic)")]
    NotABundle,
    #[error(
        "bundle format version {got} is not supported (this build reads version {BUNDLE_FORMAT_VERSION})"
    )]
    Version { got: u16 },
    #[error("the bundle is truncated: {need} bytes expected, {have} present")]
    Truncated { need: u64, have: u64 },
    #[error("the bundle's payload of {len} bytes exceeds the limit of {MAX_BUNDLE_BYTES} bytes")]
    TooLarge { len: u64 },
    #[error("the bundle is for node {to}, not for this node ({me})")]
    WrongRecipient { to: NodeId, me: NodeId },
    #[error("the bundle comes from node {from}, which is not a configured peer")]
    UnknownExporter { from: NodeId },
    #[error(
        "the bundle from {from} cannot be decrypted: it is damaged, or was not encrypted to this node's key ({detail})"
    )]
    Decrypt { from: NodeId, detail: String },
    #[error("the bundle from {from} is damaged or was altered: {detail}")]
    Damaged { from: NodeId, detail: String },
    #[error("encrypting the bundle for {to}: {detail}")]
    Encrypt { to: NodeId, detail: String },
    #[error("bundle for or from peer {peer}: {source}")]
    Store { peer: NodeId, source: StoreError },
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    pub peer: String,
    pub documents: u64,
    pub changes: u64,
    pub after: u64,
    pub upto: u64,
    pub encrypted: bool,
    pub bytes: u64,
}

/// What an import did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    pub peer: String,
    pub dry_run: bool,
    /// Objects this node did not have.
    pub added: u64,
    /// Objects this node had that receive new changes.
    pub updated: u64,
    /// Changes new to this node.
    pub new_changes: u64,
    /// Changes this node already had.
    pub duplicates: u64,
    /// Changes refused: a bad signature, or this node's policy for the exporter.
    pub rejected: u64,
    /// Of the new changes, those waiting for changes they depend on.
    pub held: u64,
}

/// The X25519 (age) identity of a node: its ed25519 secret scalar.
fn age_identity(identity: &Identity) -> Result<age::x25519::Identity, String> {
    let hrp = bech32::Hrp::parse("AGE-SECRET-KEY-").map_err(|e| e.to_string())?;
    let scalar = identity.signing_key().to_scalar_bytes();
    let encoded = bech32::encode::<bech32::Bech32>(hrp, &scalar).map_err(|e| e.to_string())?;
    encoded
        .to_uppercase()
        .parse()
        .map_err(|e: &str| e.to_string())
}

/// The X25519 (age) recipient of a node: its ed25519 key in Montgomery form.
fn age_recipient(node: &NodeId) -> Result<age::x25519::Recipient, String> {
    let key = VerifyingKey::from_bytes(&node.0).map_err(|e| e.to_string())?;
    let hrp = bech32::Hrp::parse("age").map_err(|e| e.to_string())?;
    let encoded = bech32::encode::<bech32::Bech32>(hrp, key.to_montgomery().as_bytes())
        .map_err(|e| e.to_string())?;
    encoded.parse().map_err(|e: &str| e.to_string())
}

fn header(flags: u8, from: &NodeId, to: &NodeId, len: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(BUNDLE_HEADER_BYTES);
    h.extend_from_slice(BUNDLE_MAGIC);
    h.extend_from_slice(&BUNDLE_FORMAT_VERSION.to_be_bytes());
    h.push(flags);
    h.extend_from_slice(&from.0);
    h.extend_from_slice(&to.0);
    h.extend_from_slice(&len.to_be_bytes());
    h
}

fn signed_bytes(header_without_len: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(BUNDLE_SIGNING_DOMAIN.len() + header_without_len.len() + body.len());
    m.extend_from_slice(BUNDLE_SIGNING_DOMAIN);
    m.extend_from_slice(header_without_len);
    m.extend_from_slice(body);
    m
}

/// Seal `body` as `identity` and, when `encrypt`, encrypt it to `body.to`: the bundle's bytes.
pub fn seal(identity: &Identity, body: &BundleBody, encrypt: bool) -> Result<Vec<u8>, BundleError> {
    let to = body.to;
    let flags = if encrypt { FLAG_ENCRYPTED } else { 0 };
    let encoded = postcard::to_stdvec(body).map_err(|e| BundleError::Encrypt {
        to,
        detail: e.to_string(),
    })?;
    // The signature covers the header but its length field, which depends on the payload.
    let unsized_header = header(flags, &body.from, &to, 0);
    let signed = signed_bytes(&unsized_header[..BUNDLE_HEADER_BYTES - 8], &encoded);
    let sealed = Sealed {
        body: encoded,
        signature: identity.signing_key().sign(&signed).to_bytes(),
    };
    let sealed = postcard::to_stdvec(&sealed).map_err(|e| BundleError::Encrypt {
        to,
        detail: e.to_string(),
    })?;
    let payload = if encrypt {
        let recipient = age_recipient(&to).map_err(|detail| BundleError::Encrypt { to, detail })?;
        age::encrypt(&recipient, &sealed).map_err(|e| BundleError::Encrypt {
            to,
            detail: e.to_string(),
        })?
    } else {
        sealed
    };
    let mut out = header(flags, &body.from, &to, payload.len() as u64);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The cleartext header of a bundle: (encrypted, exporter, recipient, payload).
fn read_header(bytes: &[u8]) -> Result<(bool, NodeId, NodeId, &[u8]), BundleError> {
    if bytes.len() < BUNDLE_MAGIC.len() || &bytes[..BUNDLE_MAGIC.len()] != BUNDLE_MAGIC {
        return Err(BundleError::NotABundle);
    }
    if bytes.len() < BUNDLE_HEADER_BYTES {
        return Err(BundleError::Truncated {
            need: BUNDLE_HEADER_BYTES as u64,
            have: bytes.len() as u64,
        });
    }
    let version = u16::from_be_bytes([bytes[16], bytes[17]]);
    if version != BUNDLE_FORMAT_VERSION {
        return Err(BundleError::Version { got: version });
    }
    let flags = bytes[18];
    let key = |at: usize| {
        let mut k = [0u8; 32];
        k.copy_from_slice(&bytes[at..at + 32]);
        NodeId(k)
    };
    let (from, to) = (key(19), key(51));
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[83..91]);
    let len = u64::from_be_bytes(len);
    if len > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge { len });
    }
    let have = (bytes.len() - BUNDLE_HEADER_BYTES) as u64;
    if have != len {
        return Err(BundleError::Truncated {
            need: BUNDLE_HEADER_BYTES as u64 + len,
            have: bytes.len() as u64,
        });
    }
    Ok((
        flags & FLAG_ENCRYPTED != 0,
        from,
        to,
        &bytes[BUNDLE_HEADER_BYTES..],
    ))
}

/// Open a bundle addressed to `identity`: check the header, decrypt, check the exporter's
/// signature and decode. `exporter_known` says whether an exporter is a configured peer.
pub fn open(
    identity: &Identity,
    bytes: &[u8],
    exporter_known: impl Fn(&NodeId) -> bool,
) -> Result<BundleBody, BundleError> {
    let me = identity.node_id();
    let (encrypted, from, to, payload) = read_header(bytes)?;
    if to != me {
        return Err(BundleError::WrongRecipient { to, me });
    }
    if !exporter_known(&from) {
        return Err(BundleError::UnknownExporter { from });
    }
    let damaged = |detail: String| BundleError::Damaged { from, detail };
    let decrypted;
    let sealed = if encrypted {
        let key = age_identity(identity).map_err(|detail| BundleError::Decrypt { from, detail })?;
        decrypted = age::decrypt(&key, payload).map_err(|e| BundleError::Decrypt {
            from,
            detail: e.to_string().lines().next().unwrap_or_default().to_string(),
        })?;
        &decrypted[..]
    } else {
        payload
    };
    let sealed: Sealed = postcard::from_bytes(sealed).map_err(|e| damaged(e.to_string()))?;
    let key = VerifyingKey::from_bytes(&from.0).map_err(|e| damaged(e.to_string()))?;
    let signed = signed_bytes(&bytes[..BUNDLE_HEADER_BYTES - 8], &sealed.body);
    key.verify(&signed, &Signature::from_bytes(&sealed.signature))
        .map_err(|_| damaged("the exporter's signature does not verify".into()))?;
    let body: BundleBody =
        postcard::from_bytes(&sealed.body).map_err(|e| damaged(e.to_string()))?;
    if body.from != from || body.to != to {
        return Err(damaged("the body names other nodes than the header".into()));
    }
    Ok(body)
}

impl Core {
    fn bundle_store_err(peer: NodeId) -> impl FnOnce(StoreError) -> BundleError {
        move |source| BundleError::Store { peer, source }
    }

    /// A bundle for the configured peer `name`: everything our policy for it lets out that it
    /// has not acknowledged (or, with `all`, everything the policy lets out), encrypted to it
    /// unless `encrypt` is false. `progress` is told the changes gathered so far.
    pub fn export_bundle(
        &mut self,
        name: &str,
        all: bool,
        encrypt: bool,
        progress: &dyn Fn(u64),
    ) -> Result<(Vec<u8>, ExportReport), BundleError> {
        let peer = self
            .policies
            .named(name)
            .ok_or_else(|| BundleError::UnknownPeer { name: name.into() })?;
        let err = Self::bundle_store_err(peer);
        let record = self.store.peer(&peer).map_err(err)?;
        let last = self
            .store
            .last_seq()
            .map_err(Self::bundle_store_err(peer))?;
        let after = if all { 0 } else { record.acked.min(last) };
        let mut by_ref = self.carried_to(peer)?;
        let (mut docs, mut changes) = (Vec::new(), Vec::new());
        let mut headed = HashSet::new();
        let mut cursor = after;
        while cursor < last {
            let batch = self.read_for(peer, cursor, false, &mut by_ref)?;
            if batch.upto.seq <= cursor {
                break;
            }
            cursor = batch.upto.seq;
            docs.extend(batch.docs.into_iter().filter(|h| headed.insert(h.doc)));
            changes.extend(batch.changes);
            progress(changes.len() as u64);
        }
        let upto = if cursor == 0 {
            Checkpoint::default()
        } else {
            self.store
                .checkpoint(cursor)
                .map_err(Self::bundle_store_err(peer))?
                .unwrap_or_default()
        };
        let body = BundleBody {
            from: self.node_id(),
            to: peer,
            created_ms: (self.clock)(),
            after,
            upto,
            holds: record.received,
            docs,
            changes,
        };
        let bytes = seal(self.engine.identity(), &body, encrypt)?;
        let report = ExportReport {
            peer: name.to_string(),
            documents: body.docs.len() as u64,
            changes: body.changes.len() as u64,
            after,
            upto: upto.seq,
            encrypted: encrypt,
            bytes: bytes.len() as u64,
        };
        Ok((bytes, report))
    }

    /// Import a bundle addressed to this node from a configured peer: every change is verified
    /// and checked against our policy for the exporter, exactly as if it came over the
    /// network, and stored in batches; the exporter's checkpoint moves to the bundle's end
    /// when nothing before it is missing, so the next sync carries only what the bundle did
    /// not. With `dry_run` nothing is written. A bundle that fails any check is refused whole.
    pub fn import_bundle(
        &mut self,
        bytes: &[u8],
        dry_run: bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<ImportReport, BundleError> {
        let policies = &self.policies;
        let body = open(self.engine.identity(), bytes, |n| {
            policies.name_of(n).is_some()
        })?;
        let peer = body.from;
        let mut report = ImportReport {
            peer: self.policies.name_of(&peer).unwrap_or_default().to_string(),
            dry_run,
            ..ImportReport::default()
        };
        let fresh = self.classify(&body, &mut report)?;
        let record = self
            .store
            .peer(&peer)
            .map_err(Self::bundle_store_err(peer))?;
        let moves = record.received.seq < body.upto.seq;
        if dry_run || (fresh == 0 && !moves) {
            return Ok(report);
        }
        // Stored in batches, one transaction each; only the last claims the bundle's stretch
        // of the exporter's log, once everything before it is stored.
        let total = body.changes.len() as u64;
        let headers: HashMap<DocId, &DocHeader> = body.docs.iter().map(|h| (h.doc, h)).collect();
        let n = body.changes.len().div_ceil(SYNC_BATCH_CHANGES).max(1);
        let (mut done, mut held, mut rejected) = (0, 0, 0);
        for i in 0..n {
            let start = i * SYNC_BATCH_CHANGES;
            let chunk =
                body.changes[start..(start + SYNC_BATCH_CHANGES).min(body.changes.len())].to_vec();
            // The headers of this part's documents only.
            let mut headed = HashSet::new();
            let docs: Vec<DocHeader> = chunk
                .iter()
                .filter(|c| headed.insert(c.doc))
                .filter_map(|c| headers.get(&c.doc).map(|h| (*h).clone()))
                .collect();
            let claim = (i + 1 == n).then_some(Claim {
                after: body.after,
                upto: body.upto,
                restart: false,
            });
            done += chunk.len() as u64;
            let r = self.receive_changes(peer, claim, docs, chunk)?;
            held += r.held;
            rejected += r.rejected;
            progress(done, total);
        }
        report.held = held;
        report.rejected = report.rejected.max(rejected);
        // The receipt: how far the exporter holds our log, if that is our log.
        if body.holds.seq > 0
            && self
                .store
                .checkpoint(body.holds.seq)
                .map_err(Self::bundle_store_err(peer))?
                == Some(body.holds)
        {
            self.store
                .update_peer(&peer, |r| r.acked = r.acked.max(body.holds.seq))
                .map_err(Self::bundle_store_err(peer))?;
        }
        Ok(report)
    }

    /// Count what `body` adds, updates, duplicates and has refused here; returns the number of
    /// changes new to this node.
    fn classify(&self, body: &BundleBody, report: &mut ImportReport) -> Result<u64, BundleError> {
        let peer = body.from;
        let headers: HashMap<DocId, &DocHeader> = body.docs.iter().map(|h| (h.doc, h)).collect();
        let reader = self.store.reader().map_err(Self::bundle_store_err(peer))?;
        let (mut added, mut updated) = (HashSet::new(), HashSet::new());
        let mut seen = HashSet::new();
        // By the same rule, and as fast, as a received sync batch is verified.
        for verified in crate::sync::verify_batch(&body.changes, &self.faults) {
            let Ok(v) = verified else {
                report.rejected += 1;
                continue;
            };
            if !seen.insert((v.doc, v.hash))
                || reader
                    .has_change(&v.doc, &v.hash)
                    .map_err(Self::bundle_store_err(peer))?
            {
                report.duplicates += 1;
                continue;
            }
            let record = reader
                .record(&v.doc)
                .map_err(Self::bundle_store_err(peer))?;
            let (ty, origin) = match (&record, headers.get(&v.doc)) {
                (Some(r), _) => (r.ty.clone(), r.origin),
                (None, Some(h)) if DocId::derive(&h.origin, &h.ty, &h.id) == h.doc => {
                    (h.ty.clone(), h.origin)
                }
                _ => {
                    report.rejected += 1;
                    continue;
                }
            };
            if self
                .policies
                .may_take(&peer, &ty, &origin, &v.author, false)
                .is_err()
            {
                report.rejected += 1;
                continue;
            }
            report.new_changes += 1;
            if record.is_some() {
                updated.insert(v.doc);
            } else {
                added.insert(v.doc);
            }
        }
        report.added = added.len() as u64;
        report.updated = updated.len() as u64;
        Ok(report.new_changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tidesync_proto::{ObjectId, TypeName};

    fn core(secret: u8, name: &str) -> Core {
        Core::in_memory(secret, name)
    }

    fn pair() -> (Core, Core) {
        let (mut ship, mut hub) = (core(1, "ship"), core(2, "hub"));
        let (s, h) = (ship.node_id(), hub.node_id());
        ship.set_policy(h, "hub".into(), Default::default())
            .unwrap();
        hub.set_policy(s, "ship".into(), Default::default())
            .unwrap();
        (ship, hub)
    }

    fn put(c: &mut Core, id: &str, v: serde_json::Value) {
        let (t, i) = (TypeName::new("Sample").unwrap(), ObjectId::new(id).unwrap());
        c.put(&t, &i, v.as_object().unwrap()).unwrap();
    }

    #[test]
    fn a_bundle_round_trips_and_a_second_import_changes_nothing() {
        let (mut ship, mut hub) = pair();
        put(&mut ship, "S-1", json!({"depth": 120}));
        put(&mut ship, "S-2", json!({"depth": 80}));
        let (bytes, ex) = ship.export_bundle("hub", false, true, &|_| {}).unwrap();
        assert_eq!((ex.documents, ex.changes, ex.encrypted), (2, 2, true));
        let dry = hub.import_bundle(&bytes, true, &|_, _| {}).unwrap();
        assert_eq!((dry.added, dry.new_changes), (2, 2));
        assert_eq!(hub.last_seq().unwrap(), 0, "a dry run writes nothing");
        let first = hub.import_bundle(&bytes, false, &|_, _| {}).unwrap();
        assert_eq!((first.added, first.updated, first.rejected), (2, 0, 0));
        let seq = hub.last_seq().unwrap();
        let again = hub.import_bundle(&bytes, false, &|_, _| {}).unwrap();
        assert_eq!(
            (again.added, again.new_changes, again.duplicates),
            (0, 0, 2)
        );
        assert_eq!(hub.last_seq().unwrap(), seq);
        // The hub now holds the ship's log to the bundle's end.
        let rec = hub.store().peer(&ship.node_id()).unwrap();
        assert_eq!(rec.received.seq, 2);
    }

    fn state(c: &mut Core) -> Vec<(DocId, Vec<automerge::ChangeHash>, String)> {
        let mut v: Vec<_> = c
            .audit()
            .unwrap()
            .into_iter()
            .map(|a| (a.doc, a.heads, serde_json::to_string(&a.json).unwrap()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn two_incremental_bundles_end_the_same_in_either_order() {
        let (mut ship, mut hub_x) = pair();
        // The same hub twice (one key, two stores), to import in both orders.
        let mut hub_y = core(2, "hub");
        hub_y
            .set_policy(ship.node_id(), "ship".into(), Default::default())
            .unwrap();
        put(&mut ship, "S-1", json!({"depth": 1}));
        put(&mut ship, "S-2", json!({"depth": 2}));
        let (b1, _) = ship.export_bundle("hub", false, true, &|_| {}).unwrap();
        hub_x.import_bundle(&b1, false, &|_, _| {}).unwrap();
        // The hub's bundle back is the ship's receipt: the next export starts after b1.
        let (receipt, _) = hub_x.export_bundle("ship", false, true, &|_| {}).unwrap();
        ship.import_bundle(&receipt, false, &|_, _| {}).unwrap();
        put(&mut ship, "S-1", json!({"depth": 10, "note": "rechecked"}));
        put(&mut ship, "S-3", json!({"depth": 3}));
        let (b2, ex2) = ship.export_bundle("hub", false, true, &|_| {}).unwrap();
        assert_eq!(
            (ex2.after, ex2.changes),
            (2, 2),
            "b2 carries only what b1 did not"
        );
        hub_x.import_bundle(&b2, false, &|_, _| {}).unwrap();
        let r = hub_y.import_bundle(&b2, false, &|_, _| {}).unwrap();
        assert_eq!(r.held, 1, "S-1's edit waits for its creation, in b1");
        hub_y.import_bundle(&b1, false, &|_, _| {}).unwrap();
        assert_eq!(hub_y.store().pending_count().unwrap(), 0);
        assert_eq!(state(&mut hub_x), state(&mut hub_y));
        assert_eq!(hub_y.store().peer(&ship.node_id()).unwrap().received.seq, 4);
    }

    #[test]
    fn altered_truncated_and_misaddressed_bundles_are_refused_whole() {
        let (mut ship, mut hub) = pair();
        put(&mut ship, "S-1", json!({"depth": 120}));
        for encrypt in [true, false] {
            let (bytes, _) = ship.export_bundle("hub", true, encrypt, &|_| {}).unwrap();
            let mut flipped = bytes.clone();
            let at = bytes.len() - 10;
            flipped[at] ^= 1;
            assert!(matches!(
                hub.import_bundle(&flipped, false, &|_, _| {}),
                Err(BundleError::Damaged { .. } | BundleError::Decrypt { .. })
            ));
            assert!(matches!(
                hub.import_bundle(&bytes[..bytes.len() - 1], false, &|_, _| {}),
                Err(BundleError::Truncated { .. })
            ));
            assert!(matches!(
                hub.import_bundle(b"PK\x03\x04 not ours", false, &|_, _| {}),
                Err(BundleError::NotABundle)
            ));
            let mut other = core(3, "lab");
            other
                .set_policy(ship.node_id(), "ship".into(), Default::default())
                .unwrap();
            assert!(matches!(
                other.import_bundle(&bytes, false, &|_, _| {}),
                Err(BundleError::WrongRecipient { .. })
            ));
            assert_eq!(hub.last_seq().unwrap(), 0);
        }
    }
}
