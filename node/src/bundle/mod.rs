//! Export bundles: one signed, versioned file of signed changes and the files they refer to,
//! for one peer, encrypted to that peer's key, carried where no link reaches (a ship's USB
//! stick) and imported like a sync batch. A bundle is written and read as a stream, so its
//! files may be of any size and nothing holds a whole file in memory.
//!
//! # File format (version 4)
//!
//! | Bytes | What |
//! | --- | --- |
//! | 16 | `BUNDLE_MAGIC`, `tidesync-bundle\0` |
//! | 2 | format version, big-endian (`BUNDLE_FORMAT_VERSION`) |
//! | 1 | flags: bit 0 set when the payload is encrypted |
//! | 32 | the exporter's node key |
//! | 32 | the recipient's node key |
//! | rest | payload, to the end of the file |
//!
//! The payload is, or (flag 0 set, the default) its age encryption to the recipient holds:
//!
//! | Bytes | What |
//! | --- | --- |
//! | 8 | `z`: length of the compressed records, big-endian (at most `MAX_BUNDLE_RECORDS_BYTES`) |
//! | 8 | `n`: their length uncompressed, big-endian (at most `MAX_BUNDLE_RECORDS_BYTES`) |
//! | z | the sealed records, compressed with zstd |
//! | ... | each file that `BundleBody::files` lists, in its order: exactly its size in bytes |
//!
//! Nothing follows the last file. The age recipient is an X25519 recipient whose key is the
//! recipient's ed25519 node key in Montgomery form, as age's own `ssh-ed25519` recipients
//! derive it; age's STREAM construction authenticates every 64 KiB and the end. The sealed
//! records are the postcard encoding of `Sealed { body, signature }`: `body` is the postcard
//! encoding of [`BundleBody`] and `signature` the exporter's ed25519 signature over
//! `BUNDLE_SIGNING_DOMAIN`, the 83 header bytes and `body`, so nothing in the header or the
//! body can change unnoticed. The body lists each file's BLAKE3 hash and size, so the signature
//! binds the files too: each is hashed as it is read and stored only if it matches. Every change
//! inside is signed by its own author as on the wire, and is verified again on import.
//!
//! Older versions: 1 to 3 had one in-memory payload with its length in the header, and no
//! files; 2 held checkpoint tokens made for the recipient where 1 held change hashes, and 3
//! gave a view the id made for the recipient alone. A bundle of another version is refused
//! with both versions named.
//!
//! Modules: [`stream`] (writing and reading the format), [`transfer`] (export for a peer,
//! import from one), [`files`] (the files a bundle carries, stored verified).

pub mod files;
pub mod stream;
pub mod transfer;

pub use stream::{Opened, seal};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use tidesync_proto::{Checkpoint, DocHeader, NodeId, SignedChange};

use crate::files::FileHash;
use crate::identity::Identity;
use crate::replica::SyncError;
use crate::store::StoreError;

/// The first bytes of every bundle.
pub const BUNDLE_MAGIC: &[u8; 16] = b"tidesync-bundle\0";
/// The bundle format this build writes and reads.
pub const BUNDLE_FORMAT_VERSION: u16 = 4;
/// Bytes of the cleartext header.
pub const BUNDLE_HEADER_BYTES: usize = 16 + 2 + 1 + 32 + 32;
/// Largest the sealed records of a bundle may be, compressed or not, in bytes; larger ones are
/// refused before they are read. The files that follow are not bounded by it.
pub const MAX_BUNDLE_RECORDS_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Most files one bundle may carry, and most files a bundle may say its exporter wants.
pub const MAX_BUNDLE_FILES: usize = crate::store::MAX_LACKS_PER_PEER;
/// What the exporter signs before the header and the body.
pub const BUNDLE_SIGNING_DOMAIN: &[u8] = b"tidesync/bundle/v1\0";
/// Header flag: the payload is encrypted to the recipient.
const FLAG_ENCRYPTED: u8 = 1;

/// A file a bundle carries or asks for: its BLAKE3 hash and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    pub hash: FileHash,
    pub size: u64,
}

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
    /// The files that follow the records, in their order: files objects this peer may see
    /// refer to, that it lacks as far as the exporter knows.
    pub files: Vec<BundleFile>,
    /// Files the exporter wants from the recipient: referred to by objects it received from
    /// the recipient, not stored at the exporter yet. The recipient's next bundle carries them.
    pub wants: Vec<BundleFile>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Sealed {
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
    #[error("the bundle is truncated: it ends inside its {part}")]
    Truncated { part: &'static str },
    #[error(
        "the bundle's records of {len} bytes exceed the limit of {MAX_BUNDLE_RECORDS_BYTES} bytes"
    )]
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
    #[error("writing the bundle for {to}: {source}")]
    Write { to: NodeId, source: std::io::Error },
    #[error("reading the bundle: {0}")]
    Read(std::io::Error),
    #[error("file {hash} of the bundle for {to}: {source}")]
    ExportFile {
        to: NodeId,
        hash: FileHash,
        source: Box<crate::store::FileError>,
    },
    #[error("storing file {hash} of the bundle from {from}: {source}")]
    StoreFile {
        from: NodeId,
        hash: FileHash,
        source: Box<crate::store::FileError>,
    },
    #[error(
        "the bundle's records were imported ({new_changes} new changes) and {stored} of its files stored, then: {source}"
    )]
    FilesStopped {
        new_changes: u64,
        stored: u64,
        source: Box<BundleError>,
    },
    #[error("bundle for or from peer {peer}: {source}")]
    Store { peer: NodeId, source: StoreError },
    #[error(transparent)]
    Sync(#[from] SyncError),
}

impl BundleError {
    /// This error, met storing the files of a bundle whose records `report` imported.
    pub fn after_records(self, report: &ImportReport) -> BundleError {
        BundleError::FilesStopped {
            new_changes: report.new_changes,
            stored: report.files_stored,
            source: Box::new(self),
        }
    }
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
    /// The bundle's size in bytes (0 until it is written).
    pub bytes: u64,
    /// Files carried, and their bytes.
    #[serde(default)]
    pub files: u64,
    #[serde(default)]
    pub file_bytes: u64,
    /// Files this node asks the peer's next bundle to carry.
    #[serde(default)]
    pub wants: u64,
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
    /// Files the bundle carries.
    #[serde(default)]
    pub files: u64,
    /// Of those, the files stored here now (each verified against its hash first), and
    /// their bytes; the others were stored already or are not wanted here.
    #[serde(default)]
    pub files_stored: u64,
    #[serde(default)]
    pub file_bytes_stored: u64,
}

/// The X25519 (age) identity of a node: its ed25519 secret scalar.
pub(crate) fn age_identity(identity: &Identity) -> Result<age::x25519::Identity, String> {
    let hrp = bech32::Hrp::parse("AGE-SECRET-KEY-").map_err(|e| e.to_string())?;
    let scalar = identity.signing_key().to_scalar_bytes();
    let encoded = bech32::encode::<bech32::Bech32>(hrp, &scalar).map_err(|e| e.to_string())?;
    encoded
        .to_uppercase()
        .parse()
        .map_err(|e: &str| e.to_string())
}

/// The X25519 (age) recipient of a node: its ed25519 key in Montgomery form.
pub(crate) fn age_recipient(node: &NodeId) -> Result<age::x25519::Recipient, String> {
    let key = VerifyingKey::from_bytes(&node.0).map_err(|e| e.to_string())?;
    let hrp = bech32::Hrp::parse("age").map_err(|e| e.to_string())?;
    let encoded = bech32::encode::<bech32::Bech32>(hrp, key.to_montgomery().as_bytes())
        .map_err(|e| e.to_string())?;
    encoded.parse().map_err(|e: &str| e.to_string())
}
