//! Everything that crosses between tidesync nodes: who is who, what a signed change is, and how
//! messages are framed on the wire. This crate does not depend on the node.
//!
//! # Layout
//! - [`ids`]: node ids (ed25519 public keys, shown as libp2p PeerIds), document ids, type and
//!   object names, and the Automerge actor ids derived from a node key.
//! - [`chunk`]: our own bounded reader of Automerge change chunks (header, hash, op columns),
//!   and the limits ([`chunk::MAX_CHANGE_BYTES`], [`chunk::MAX_OPS_PER_CHANGE`]) it enforces
//!   before Automerge decodes untrusted bytes.
//! - `craft` (tests only, `fault-injection` feature): hand-made hostile change chunks.
//! - [`change`]: the signed change envelope: signing a change, verifying author, hash and document.
//! - [`files`]: the files protocol's messages (a segment asked for, answered bao-encoded)
//!   and their codec, bounded by [`files::MAX_FILE_FRAME_BYTES`].
//! - [`fleet`]: a node's signed status record for its direct peers (the fleet view).
//! - [`wire`]: the versioned wire message enum and its length-prefixed codec, bounded by
//!   [`wire::MAX_FRAME_BYTES`].

pub mod change;
pub mod chunk;
#[cfg(any(test, feature = "fault-injection"))]
pub mod craft;
pub mod files;
pub mod fleet;
pub mod ids;
pub mod wire;

pub use change::{
    AuthorKey, DecodedChange, SignedChange, VerifiedChange, VerifyError, check_batch, parse_change,
};
pub use chunk::{ChunkError, MAX_CHANGE_BYTES, MAX_OPS_PER_CHANGE};
pub use ids::{DocId, IdError, NodeId, ObjectId, TypeName};
pub use wire::{Checkpoint, DecodeError, DocHeader, Message, PROTOCOL_VERSION};
