//! Response bodies that blocking code writes: chunks through a bounded channel, so memory
//! stays flat whatever the body's size.

use axum::body::Body;
use tokio::sync::mpsc;

/// Chunks that may wait for a slow client, per response.
pub const BODY_CHANNEL_CHUNKS: usize = 4;
/// Bytes a [`ChunkWriter`] gathers before it sends them.
pub const BODY_CHUNK_BYTES: usize = 1024 * 1024;

/// One item of a streamed body: bytes, or the error that ends it (the client sees the
/// response cut off rather than a short body taken for whole).
pub type Chunk = Result<Vec<u8>, std::io::Error>;

/// A bounded channel of chunks and the response body that streams it.
pub fn channel() -> (mpsc::Sender<Chunk>, Body) {
    let (tx, rx) = mpsc::channel::<Chunk>(BODY_CHANNEL_CHUNKS);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, Body::from_stream(stream))
}

/// A blocking [`std::io::Write`] into a body channel, in chunks of [`BODY_CHUNK_BYTES`]; what
/// is left is sent on flush and on drop. A client gone away is a broken pipe.
pub struct ChunkWriter {
    tx: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    pub fn new(tx: mpsc::Sender<Chunk>) -> ChunkWriter {
        ChunkWriter {
            tx,
            buf: Vec::new(),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = bytes.len().min(BODY_CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() >= BODY_CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        let _ = self.send();
    }
}
