//! Export bundles: one signed, versioned file of signed changes for one peer, encrypted to that
//! peer's key, carried where no link reaches (a ship's USB stick) and imported like a sync batch.
//!
//! # File format (version 3)
//!
//! Version 2 has version 1's layout; its checkpoints (`upto`, `holds`) hold tokens made for
//! the recipient (see [`crate::identity::Identity::checkpoint_token`]) where version 1 held
//! change hashes, which leaked the hash of changes the recipient may not see. Version 3 has
//! version 2's layout; a view it carries has the id made for the recipient alone
//! (`DocId::derive_view`, as in protocol 4). A bundle of another version is refused with both
//! versions named.
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
//!
//! Modules: [`transfer`] (export for a peer, import from one).

pub mod transfer;

use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use tidesync_proto::{Checkpoint, DocHeader, NodeId, SignedChange};

use crate::identity::Identity;
use crate::replica::SyncError;
use crate::store::StoreError;

/// The first bytes of every bundle.
pub const BUNDLE_MAGIC: &[u8; 16] = b"tidesync-bundle\0";
/// The bundle format this build writes and reads.
pub const BUNDLE_FORMAT_VERSION: u16 = 3;
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
        "the bundle is signed by {from}, a key revoked when its peer's key was replaced; nothing was imported"
    )]
    RevokedExporter { from: NodeId },
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
    /// The exporter's node id (its PeerId).
    #[serde(default)]
    pub from: String,
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
