//! The files protocol: a request for one segment of a file, answered with that segment in
//! BLAKE3 verified streaming (bao) encoding, which the asker checks against the file's hash.
//!
//! # Wire format (`/tidesync/files/1`)
//! A frame is a 4-byte big-endian body length, then the body: the postcard encoding of
//! [`FILES_PROTOCOL_VERSION`] (`u16`, varint) followed by a [`FileAsk`] (request) or a
//! [`FileAnswer`] (response). A frame over [`MAX_FILE_FRAME_BYTES`] is refused before it is
//! buffered, and one of another version before its message is decoded.
//!
//! A file of `size` bytes is cut into segments of [`SEGMENT_BYTES`] (the last may be
//! shorter). Segment `n`'s answer is the bao encoding of chunks `[n·1024, (n+1)·1024)` of the
//! tree of `size` bytes with 16 KiB chunk groups ([`CHUNK_GROUP_LOG`]): the parent hash pairs
//! from the root down to the segment, then its data, so that every 16 KiB is checked against
//! the file's hash as it is decoded. There is no request for "any hash": a node answers
//! [`FileAnswer::Unknown`] alike for a file it lacks and for one the asker may not have.

use serde::{Deserialize, Serialize};

/// Version of the files protocol spoken by this build.
/// - 1: the first files protocol.
pub const FILES_PROTOCOL_VERSION: u16 = 1;
/// Bytes in a segment, the unit asked for and verified whole (1 MiB).
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// A bao chunk group is 2^this chunks of 1 KiB: 16 KiB, so the outboard beside a file is
/// 64 bytes per 16 KiB (0.4 %).
pub const CHUNK_GROUP_LOG: u8 = 4;
/// Largest files-protocol frame body, in bytes: one segment with its parent hashes (a
/// 1 TiB file's tree is 26 levels above a segment, 63 pairs within one) and slack.
pub const MAX_FILE_FRAME_BYTES: usize = SEGMENT_BYTES as usize + 64 * 1024;
/// Size of the length prefix, in bytes.
pub const FILE_FRAME_HEADER_BYTES: usize = 4;

/// Ask for segment `segment` of the file whose BLAKE3 hash is `hash` and whose size is
/// `size` (as the reference the asker holds says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileAsk {
    pub hash: [u8; 32],
    pub size: u64,
    pub segment: u64,
}

/// The answer to a [`FileAsk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileAnswer {
    /// The segment, bao-encoded (see the module's docs).
    Segment(#[serde(with = "crate::change::serde_bytes_vec")] Vec<u8>),
    /// Not here, or not for you: the same answer for both.
    Unknown,
    /// Here, but the node is serving as many segments as it will at once: ask again soon.
    Busy,
}

/// Why a files-protocol frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileFrameError {
    #[error("file frame of {len} bytes exceeds the limit of {MAX_FILE_FRAME_BYTES} bytes")]
    TooLarge { len: usize },
    #[error("peer speaks files protocol version {got}, this node speaks {FILES_PROTOCOL_VERSION}")]
    Version { got: u16 },
    #[error("file frame body is not a valid message: {0}")]
    Malformed(String),
}

impl FileAsk {
    /// Segments in a file of `size` bytes.
    pub fn segments(size: u64) -> u64 {
        size.div_ceil(SEGMENT_BYTES)
    }
}

/// Encode one frame: length prefix, version, message.
pub fn encode_file_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FileFrameError> {
    let mut out = vec![0u8; FILE_FRAME_HEADER_BYTES];
    out = postcard::to_extend(&FILES_PROTOCOL_VERSION, out)
        .and_then(|out| postcard::to_extend(msg, out))
        .map_err(|e| FileFrameError::Malformed(e.to_string()))?;
    let len = out.len() - FILE_FRAME_HEADER_BYTES;
    if len > MAX_FILE_FRAME_BYTES {
        return Err(FileFrameError::TooLarge { len });
    }
    out[..FILE_FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The body length a frame header announces, checked against [`MAX_FILE_FRAME_BYTES`].
pub fn file_frame_len(header: [u8; FILE_FRAME_HEADER_BYTES]) -> Result<usize, FileFrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FILE_FRAME_BYTES {
        return Err(FileFrameError::TooLarge { len });
    }
    Ok(len)
}

/// Decode a frame body (the bytes after the length prefix).
pub fn decode_file_body<T: for<'a> Deserialize<'a>>(body: &[u8]) -> Result<T, FileFrameError> {
    if body.len() > MAX_FILE_FRAME_BYTES {
        return Err(FileFrameError::TooLarge { len: body.len() });
    }
    let (version, rest) = postcard::take_from_bytes::<u16>(body)
        .map_err(|e| FileFrameError::Malformed(e.to_string()))?;
    if version != FILES_PROTOCOL_VERSION {
        return Err(FileFrameError::Version { got: version });
    }
    let (msg, rest) = postcard::take_from_bytes::<T>(rest)
        .map_err(|e| FileFrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FileFrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let ask = FileAsk {
            hash: [7; 32],
            size: 5 * SEGMENT_BYTES + 1,
            segment: 5,
        };
        let frame = encode_file_frame(&ask).unwrap();
        let len = file_frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode_file_body::<FileAsk>(&frame[4..]).unwrap(), ask);
        assert_eq!(FileAsk::segments(ask.size), 6);
        assert_eq!(FileAsk::segments(0), 0);
        let big = FileAnswer::Segment(vec![0; MAX_FILE_FRAME_BYTES]);
        assert!(matches!(
            encode_file_frame(&big),
            Err(FileFrameError::TooLarge { .. })
        ));
        assert!(matches!(
            file_frame_len(((MAX_FILE_FRAME_BYTES + 1) as u32).to_be_bytes()),
            Err(FileFrameError::TooLarge { .. })
        ));
        let mut other = frame[4..].to_vec();
        other[0] = 9;
        assert_eq!(
            decode_file_body::<FileAsk>(&other),
            Err(FileFrameError::Version { got: 9 })
        );
        let mut trailing = frame[4..].to_vec();
        trailing.push(0);
        assert!(matches!(
            decode_file_body::<FileAsk>(&trailing),
            Err(FileFrameError::Malformed(_))
        ));
    }
}
