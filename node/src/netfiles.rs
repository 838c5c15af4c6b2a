//! The files protocol's libp2p side: its name, stream caps and frame codec (the messages and
//! their format are in `tidesync_proto::files`).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response::{self, ProtocolSupport};
use serde::{Deserialize, Serialize};
use tidesync_proto::files::{
    FILE_FRAME_HEADER_BYTES, FileAnswer, FileAsk, decode_file_body, encode_file_frame,
    file_frame_len,
};

use crate::net::NetCounters;

/// The files protocol's libp2p name; each frame carries its version as well.
pub const FILES_PROTOCOL: &str = "/tidesync/files/1";
/// How long a segment ask may wait for its answer, in seconds (1 MiB over a slow link).
pub const FILE_REQUEST_TIMEOUT_SECS: u64 = 60;
// The fetcher sizes its asks to arrive in half the time an ask may wait.
const _: () = assert!(2 * crate::sync::fetch::ASK_TARGET_SECS <= FILE_REQUEST_TIMEOUT_SECS);
/// Most files-protocol streams open at once on one connection, both directions: our asks
/// in flight to the peer and its asks of us.
pub const MAX_FILE_STREAMS_PER_CONNECTION: usize = 2 * crate::sync::fetch::MAX_ASKS_PER_PEER;

/// What arrives on a files stream: a message, or why its frame was unusable (the node drops
/// that peer's connection, as for a bad sync frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFrame<T> {
    Message(T),
    Bad(String),
}

/// Reads and writes [`FileAsk`] and [`FileAnswer`] frames, counting their bytes.
#[derive(Debug, Clone, Default)]
pub struct FileCodec {
    counters: Arc<NetCounters>,
    fault: crate::fault::Fault,
}

/// The files behaviour, counting into `counters`.
pub fn behaviour(
    counters: Arc<NetCounters>,
    fault: crate::fault::Fault,
) -> request_response::Behaviour<FileCodec> {
    request_response::Behaviour::with_codec(
        FileCodec { counters, fault },
        [(StreamProtocol::new(FILES_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(FILE_REQUEST_TIMEOUT_SECS))
            .with_max_concurrent_streams(MAX_FILE_STREAMS_PER_CONNECTION),
    )
}

impl FileCodec {
    async fn read<T, R>(&self, io: &mut R) -> io::Result<FileFrame<T>>
    where
        T: for<'a> Deserialize<'a>,
        R: AsyncRead + Unpin + Send,
    {
        let mut header = [0u8; FILE_FRAME_HEADER_BYTES];
        io.read_exact(&mut header).await?;
        let len = match file_frame_len(header) {
            Ok(len) => len,
            Err(e) => return Ok(FileFrame::Bad(e.to_string())),
        };
        let body = crate::net::read_body(io, len).await?;
        self.counters
            .file_bytes_in
            .fetch_add((FILE_FRAME_HEADER_BYTES + len) as u64, Ordering::Relaxed);
        Ok(match decode_file_body(&body) {
            Ok(msg) => FileFrame::Message(msg),
            Err(e) => FileFrame::Bad(e.to_string()),
        })
    }

    async fn write<T, W>(&self, io: &mut W, frame: FileFrame<T>) -> io::Result<()>
    where
        T: Serialize,
        W: AsyncWrite + Unpin + Send,
    {
        let FileFrame::Message(msg) = frame else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a bad frame is never sent",
            ));
        };
        let bytes =
            encode_file_frame(&msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        io.write_all(&bytes).await?;
        self.counters
            .file_bytes_out
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        io.close().await
    }
}

impl request_response::Codec for FileCodec {
    type Protocol = StreamProtocol;
    type Request = FileFrame<FileAsk>;
    type Response = FileFrame<FileAnswer>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Self::Request> {
        self.read(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Self::Response> {
        self.read(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Self::Request,
    ) -> io::Result<()> {
        self.write(io, req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        mut res: Self::Response,
    ) -> io::Result<()> {
        if self.fault == crate::fault::Fault::CorruptFiles
            && let FileFrame::Message(FileAnswer::Segment(bytes)) = &mut res
            && let Some(b) = bytes.last_mut()
        {
            *b ^= 0x01;
        }
        self.write(io, res).await
    }
}
