//! The versioned wire messages exchanged between nodes and their length-prefixed frame codec.
//!
//! Frame format: a 4-byte big-endian body length, then the body. The body is the postcard
//! encoding of the protocol version (`u16`, varint), one codec byte, and the postcard encoding
//! of a [`Message`]: as it is ([`CODEC_PLAIN`]), or as one zstd frame that declares its
//! content size ([`CODEC_ZSTD`]; the sender compresses a message of [`COMPRESS_MIN_BYTES`] or
//! more when that makes it smaller). A frame whose length exceeds [`MAX_FRAME_BYTES`] is
//! refused before any of it is buffered or decoded, a frame of another protocol version before
//! its message is decoded, and a compressed message that declares more than
//! [`MAX_FRAME_BYTES`], or none, before it is decompressed; decompression stops at the size
//! declared, so no frame decompresses to more.

use serde::{Deserialize, Serialize};

use crate::change::SignedChange;
use crate::ids::{DocId, NodeId, ObjectId, TypeName};

/// Version of the wire protocol spoken by this build. Bumped on any incompatible change.
///
/// - 1: the first protocol.
/// - 2: `Hello` and `Changes` carry the sender's number for them and `Ack` echoes it, so that
///   an Ack names exactly the request it answers (version 1 matched Acks by `upto`, which two
///   batches can share, and could not tell a stale Hello's answer from the latest one's).
/// - 3: a [`Checkpoint`]'s hash is a token the sender makes for that receiver (an HMAC of the
///   entry's change hash under the sender's secret), no longer the change hash itself, which
///   leaked the hash of entries the receiver may not see (a change behind a `--fields` view,
///   a skipped type) and let it test guesses of their content.
/// - 4: a view (`fields`) has its own id for each receiver, [`DocId::derive_view`], which a
///   header may carry besides [`DocId::derive`]; before, a view had its object's id and every
///   peer got the same one, so a peer holding the full object refused the view.
/// - 5: [`Message::Status`], a node's signed status record for its direct peers (the fleet
///   view), answered with an `Ack` whose `batch` is [`STATUS_ACK`].
/// - 6: the codec byte: messages of [`COMPRESS_MIN_BYTES`] or more travel zstd-compressed
///   when that makes them smaller (batches of lab records shrink to about a fifth; see
///   `zstdbench` in the README).
/// - 7: [`Message::Ahead`], changes of a peer's priority types sent ahead of log order; they
///   claim nothing about the sender's log, so the checkpoint's no-gap rule is untouched.
pub const PROTOCOL_VERSION: u16 = 7;
/// The codec byte of a message sent as it is.
pub const CODEC_PLAIN: u8 = 0;
/// The codec byte of a message sent as one zstd frame.
pub const CODEC_ZSTD: u8 = 1;
/// Smallest encoded message the sender tries to compress, in bytes.
pub const COMPRESS_MIN_BYTES: usize = 1024;
/// The zstd level messages are compressed at: level 3 compressed batches of lab records at
/// about 500 MB/s on the 2-core VM, thousands of times faster than a ship's link carries them.
pub const ZSTD_LEVEL: i32 = 3;
/// The `batch` of the `Ack` that answers a [`Message::Status`] (no batch or Hello has it:
/// their numbers count up from 1).
pub const STATUS_ACK: u64 = u64::MAX;
/// Largest frame body accepted or produced, in bytes.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;
/// Size of the length prefix, in bytes.
pub const FRAME_HEADER_BYTES: usize = 4;

/// A position in a node's change log: the SEQ and a 32-byte token of the entry stored at it,
/// which the log's owner makes for the one peer it gives the checkpoint to (never the
/// change's own hash). `seq == 0` (with a zero token) is the start of the log. Carrying the
/// token lets a node notice that a checkpoint does not belong to its log (it was restored
/// from an older copy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// What a receiver needs to know of a document it may not have yet. `doc` must be
/// `DocId::derive(origin, ty, id)`, or `DocId::derive_view(origin, receiver, ty, id)` for a
/// view written for that receiver (see [`DocId::names`]), so a header cannot be altered
/// without being noticed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocHeader {
    pub doc: DocId,
    pub origin: NodeId,
    pub ty: TypeName,
    pub id: ObjectId,
}

/// A message between two nodes. Requests are `Hello`, `Changes` and `Rewound`; every request is
/// answered with an `Ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Opens a session. `resume` is where the receiver should start sending its change log to
    /// the sender (the sender has durably stored everything up to it); `tip` is the sender's
    /// own last SEQ.
    Hello {
        /// The sender's number for this Hello, from the same sequence as its batch numbers;
        /// the Ack carries it back, so that only the answer to the latest Hello counts.
        number: u64,
        node: NodeId,
        name: String,
        resume: Checkpoint,
        tip: u64,
    },
    /// Changes from the sender's log after SEQ `after`, up to `upto`, in log order (which
    /// respects each document's dependencies). `docs` has a header for every document the batch
    /// touches. Entries the receiver already has may be left out, so `changes` can be empty
    /// while `upto` advances. The receiver moves its checkpoint only when `after` is where it
    /// stands (or 0, a sender starting over), so a batch is never skipped.
    Changes {
        /// The sender's number for this batch, unique within its session (from 1); the
        /// batch's Ack carries it back.
        batch: u64,
        after: u64,
        docs: Vec<DocHeader>,
        changes: Vec<SignedChange>,
        upto: Checkpoint,
        tip: u64,
    },
    /// The sender of this message was restored from an older copy and lost changes: resend
    /// your log after `resume`, including what it once received from the sender.
    Rewound { resume: Checkpoint },
    /// The answer to every request. For `Changes`: everything up to `upto` is durably stored;
    /// `rejected` of the batch's changes failed verification or policy.
    Ack {
        /// The batch or Hello answered (its number), 0 for a Rewound, [`STATUS_ACK`] for a
        /// Status.
        batch: u64,
        upto: u64,
        rejected: u32,
    },
    /// The sender's own status record (see [`crate::fleet`]); `rejected` of its Ack is 1 when
    /// the receiver refused it.
    Status { status: crate::fleet::SignedStatus },
    /// Changes of the types the sender's policy gives priority to for the receiver, sent
    /// ahead of the rest of its log (version 7). Unlike `Changes` they claim nothing about the
    /// sender's log: the receiver stores what its policy takes and its checkpoint stays where
    /// it is; the log-order batches that follow leave out what the receiver acknowledged here.
    /// `batch` comes from the same sequence as the `Changes` numbers; the `Ack` echoes it
    /// with `upto` 0.
    Ahead {
        batch: u64,
        docs: Vec<DocHeader>,
        changes: Vec<SignedChange>,
    },
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge { len: usize },
    #[error("frame is truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("peer speaks protocol version {got}, this node speaks {PROTOCOL_VERSION}")]
    Version { got: u16 },
    #[error("frame body is not a valid message: {0}")]
    Malformed(String),
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("message encodes to {len} bytes, over the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge { len: usize },
    #[error("message could not be encoded: {0}")]
    Serialize(String),
}

/// Encode `msg` as one frame: length prefix, version, codec, message (compressed when that
/// pays). The message as it is must fit in [`MAX_FRAME_BYTES`], compressed or not, so that
/// every receiver can hold it decompressed.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let plain = postcard::to_stdvec(msg).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    let len = encoded_size(&PROTOCOL_VERSION) + 1 + plain.len();
    if len > MAX_FRAME_BYTES {
        return Err(EncodeError::TooLarge { len });
    }
    let packed = if plain.len() >= COMPRESS_MIN_BYTES {
        zstd::bulk::compress(&plain, ZSTD_LEVEL)
            .ok()
            .filter(|p| p.len() < plain.len())
    } else {
        None
    };
    let (codec, payload) = match &packed {
        Some(p) => (CODEC_ZSTD, p.as_slice()),
        None => (CODEC_PLAIN, plain.as_slice()),
    };
    let mut out = vec![0u8; FRAME_HEADER_BYTES];
    out = postcard::to_extend(&PROTOCOL_VERSION, out)
        .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    out.push(codec);
    out.extend_from_slice(payload);
    let len = out.len() - FRAME_HEADER_BYTES;
    out[..FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The bytes `msg` takes on the wire as one frame, compression included (it is encoded to
/// know); a message that cannot be encoded counts at its size as it is.
pub fn frame_bytes(msg: &Message) -> usize {
    encode(msg).map_or_else(
        |_| FRAME_HEADER_BYTES + encoded_size(&PROTOCOL_VERSION) + 1 + encoded_size(msg),
        |frame| frame.len(),
    )
}

/// The postcard size of `value`, counted without writing it.
fn encoded_size<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default()).unwrap_or(0)
}

/// The body length announced by a frame header, checked against [`MAX_FRAME_BYTES`].
pub fn frame_len(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge { len });
    }
    Ok(len)
}

/// Decode a frame body (the bytes after the length prefix).
pub fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge { len: body.len() });
    }
    let (version, rest) = postcard::take_from_bytes::<u16>(body)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version { got: version });
    }
    let Some((&codec, rest)) = rest.split_first() else {
        return Err(DecodeError::Malformed("no codec byte".into()));
    };
    let unpacked;
    let rest = match codec {
        CODEC_PLAIN => rest,
        CODEC_ZSTD => {
            unpacked = decompress(rest)?;
            unpacked.as_slice()
        }
        other => return Err(DecodeError::Malformed(format!("unknown codec {other}"))),
    };
    let (msg, rest) = postcard::take_from_bytes::<Message>(rest)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(msg)
}

/// A compressed message, decompressed: it must declare its size, at most [`MAX_FRAME_BYTES`],
/// and decompress to exactly that (nothing past it is ever written).
fn decompress(packed: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let declared = zstd::zstd_safe::get_frame_content_size(packed)
        .map_err(|_| DecodeError::Malformed("not a zstd frame".into()))?
        .ok_or_else(|| DecodeError::Malformed("zstd frame without its size".into()))?;
    let size = usize::try_from(declared).unwrap_or(usize::MAX);
    if size > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge { len: size });
    }
    let plain = zstd::bulk::decompress(packed, size)
        .map_err(|e| DecodeError::Malformed(format!("zstd: {e}")))?;
    if plain.len() != size {
        return Err(DecodeError::Malformed(format!(
            "zstd frame declared {size} bytes and held {}",
            plain.len()
        )));
    }
    Ok(plain)
}

/// Decode one whole frame from the front of `buf`, returning the message and the bytes used.
/// `Ok(None)` means more bytes are needed; an error means the stream is unusable.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(header) = buf.get(..FRAME_HEADER_BYTES) else {
        return Ok(None);
    };
    let len = frame_len(header.try_into().map_err(|_| DecodeError::Truncated {
        need: FRAME_HEADER_BYTES,
        have: buf.len(),
    })?)?;
    let Some(body) = buf.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, FRAME_HEADER_BYTES + len)))
}

/// Decode exactly one frame that must fill `buf`; a short buffer is an error.
pub fn decode_exact(buf: &[u8]) -> Result<Message, DecodeError> {
    match decode(buf)? {
        Some((msg, used)) if used == buf.len() => Ok(msg),
        Some((_, used)) => Err(DecodeError::Malformed(format!(
            "{} bytes after the frame",
            buf.len() - used
        ))),
        None => {
            let need = buf
                .get(..FRAME_HEADER_BYTES)
                .and_then(|h| h.try_into().ok())
                .map(|h| u32::from_be_bytes(h) as usize + FRAME_HEADER_BYTES)
                .unwrap_or(FRAME_HEADER_BYTES);
            Err(DecodeError::Truncated {
                need,
                have: buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<[u8; 32]>(),
                ".{0,40}",
                any::<u64>(),
                any::<[u8; 32]>(),
                any::<u64>()
            )
                .prop_map(|(k, name, seq, hash, tip)| Message::Hello {
                    number: tip / 2,
                    node: NodeId(k),
                    name,
                    resume: Checkpoint { seq, hash },
                    tip
                }),
            (
                proptest::collection::vec(
                    (
                        any::<[u8; 16]>(),
                        proptest::collection::vec(any::<u8>(), 0..200),
                        any::<[u8; 32]>()
                    ),
                    0..8
                ),
                any::<u64>(),
                "[A-Z][a-z]{0,8}",
                "[a-z0-9-]{1,12}"
            )
                .prop_map(|(cs, upto, ty, id)| Message::Changes {
                    batch: upto / 3,
                    after: upto / 2,
                    docs: vec![DocHeader {
                        doc: DocId([1; 16]),
                        origin: NodeId([2; 32]),
                        ty: TypeName::new(ty).unwrap(),
                        id: ObjectId::new(id).unwrap(),
                    }],
                    changes: cs
                        .into_iter()
                        .map(|(d, bytes, s)| {
                            let mut signature = [0u8; 64];
                            signature[..32].copy_from_slice(&s);
                            SignedChange {
                                doc: DocId(d),
                                bytes,
                                signature,
                            }
                        })
                        .collect(),
                    upto: Checkpoint {
                        seq: upto,
                        hash: [3; 32]
                    },
                    tip: upto,
                }),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(batch, upto, rejected)| {
                Message::Ack {
                    batch,
                    upto,
                    rejected,
                }
            }),
            any::<u64>().prop_map(|seq| Message::Rewound {
                resume: Checkpoint { seq, hash: [4; 32] }
            }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..200)).prop_map(
                |(batch, bytes)| Message::Ahead {
                    batch,
                    docs: vec![DocHeader {
                        doc: DocId([5; 16]),
                        origin: NodeId([6; 32]),
                        ty: TypeName::new("Sample").unwrap(),
                        id: ObjectId::new("S-1").unwrap(),
                    }],
                    changes: vec![SignedChange {
                        doc: DocId([5; 16]),
                        bytes,
                        signature: [7; 64],
                    }],
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(msg in arb_message()) {
            let frame = encode(&msg).unwrap();
            prop_assert_eq!(frame_bytes(&msg), frame.len());
            prop_assert_eq!(decode_exact(&frame).unwrap(), msg.clone());
            // Every strict prefix asks for more bytes instead of yielding a message.
            for cut in 0..frame.len() {
                prop_assert_eq!(decode(&frame[..cut]).unwrap(), None);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let _ = decode_body(&bytes);
        }
    }

    /// A frame of `codec` and `payload` as a peer could send it.
    fn raw_frame(codec: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = postcard::to_stdvec(&PROTOCOL_VERSION).unwrap();
        body.push(codec);
        body.extend_from_slice(payload);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    }

    #[test]
    fn batches_travel_compressed_and_small_messages_as_they_are() {
        let change = |i: u8| SignedChange {
            doc: DocId([i; 16]),
            bytes: b"{\"title\": \"Water sample\", \"client\": \"Client 7\"}".repeat(8),
            signature: [i; 64],
        };
        let batch = Message::Changes {
            batch: 1,
            after: 0,
            docs: vec![],
            changes: (0..50).map(change).collect(),
            upto: Checkpoint::default(),
            tip: 50,
        };
        let frame = encode(&batch).unwrap();
        assert_eq!(frame[FRAME_HEADER_BYTES + 1], CODEC_ZSTD);
        let plain = postcard::to_stdvec(&batch).unwrap().len();
        assert!(frame.len() * 4 < plain, "{} of {plain}", frame.len());
        assert_eq!(decode_exact(&frame).unwrap(), batch);
        let ack = Message::Ack {
            batch: 1,
            upto: 50,
            rejected: 0,
        };
        let frame = encode(&ack).unwrap();
        assert_eq!(frame[FRAME_HEADER_BYTES + 1], CODEC_PLAIN);
        assert_eq!(decode_exact(&frame).unwrap(), ack);
    }

    // A compressed frame is a bomb if it may decompress to more than any frame may hold: it is
    // refused from the size it declares, or when it holds more than it declared, or when it
    // declares none; and an unknown codec is refused.
    #[test]
    fn compressed_frames_never_decompress_past_the_limit() {
        let zeros = vec![0u8; MAX_FRAME_BYTES + 1];
        let bomb = zstd::bulk::compress(&zeros, 1).unwrap();
        assert!(bomb.len() < 4096);
        assert!(matches!(
            decode_exact(&raw_frame(CODEC_ZSTD, &bomb)),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut two = zstd::bulk::compress(&[0u8; 1000], 1).unwrap();
        two.extend(zstd::bulk::compress(&[0u8; 1000], 1).unwrap());
        assert!(matches!(
            decode_exact(&raw_frame(CODEC_ZSTD, &two)),
            Err(DecodeError::Malformed(_))
        ));
        let no_size = zstd::stream::encode_all(&[0u8; 1000][..], 1).unwrap();
        assert!(matches!(
            decode_exact(&raw_frame(CODEC_ZSTD, &no_size)),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_exact(&raw_frame(7, &[0])),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        let header = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(decode(&header), Err(DecodeError::TooLarge { .. })));
        let big = Message::Changes {
            batch: 1,
            after: 0,
            docs: vec![],
            changes: vec![SignedChange {
                doc: DocId([0; 16]),
                bytes: vec![7; MAX_FRAME_BYTES],
                signature: [0; 64],
            }],
            upto: Checkpoint::default(),
            tip: 1,
        };
        assert!(matches!(encode(&big), Err(EncodeError::TooLarge { .. })));
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let mut frame = encode(&Message::Ack {
            batch: 0,
            upto: 5,
            rejected: 0,
        })
        .unwrap();
        frame[FRAME_HEADER_BYTES] = 9; // version varint
        assert_eq!(decode_exact(&frame), Err(DecodeError::Version { got: 9 }));
        let garbage = [0, 0, 0, 3, PROTOCOL_VERSION as u8, 0xff, 0xff];
        assert!(matches!(
            decode_exact(&garbage),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_exact(&[0, 0, 0, 9, 1]),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
