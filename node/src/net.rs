//! The libp2p shell: TCP + Noise + Yamux, connection gating to configured peers, the
//! request-response sync protocol with its frame codec, reconnect backoff, and test-only faults.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, Swarm, noise, ping, tcp, yamux};
use rand::{Rng, RngExt};
use tidesync_proto::Message;
use tidesync_proto::wire::{self, FRAME_HEADER_BYTES, MAX_FRAME_BYTES};

use crate::identity::Identity;

/// The sync protocol's libp2p name; its version follows `PROTOCOL_VERSION`.
pub const PROTOCOL: &str = "/tidesync/sync/1";
/// How long a request may wait for its response, in seconds (a batch is applied before the
/// answer, and a slow link carries up to `MAX_FRAME_BYTES`).
pub const REQUEST_TIMEOUT_SECS: u64 = 120;
/// A connection with no open stream is closed after this many seconds.
pub const IDLE_CONNECTION_TIMEOUT_SECS: u64 = 600;
/// First delay before redialing a peer that is down, in milliseconds.
pub const RECONNECT_BACKOFF_MIN_MS: u64 = 250;
/// Longest delay between redials, in milliseconds.
pub const RECONNECT_BACKOFF_MAX_MS: u64 = 30_000;
/// How often the node checks for peers due a redial, in milliseconds.
pub const DIAL_TICK_MS: u64 = 100;

/// Test-only faults, chosen with the environment variable `TIDESYNC_FAULT`. They exist so
/// that integration tests can make a real node misbehave; never set it in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Alter changes relayed from other authors (a dishonest hub).
    AlterRelayed,
    /// Send frames whose bodies are random bytes.
    GarbageFrames,
    /// Send a frame header, then only part of the body.
    TruncatedFrames,
    /// Send a frame header announcing more than `MAX_FRAME_BYTES`.
    OversizedFrames,
    /// Ignore this node's own policies when writing and sending (a misconfigured or
    /// malicious peer): read-only types can be written, and everything is offered to every
    /// peer. Receivers must still refuse what their policies do not allow.
    IgnorePolicy,
}

impl Fault {
    pub const ENV: &'static str = "TIDESYNC_FAULT";

    /// The fault named by `TIDESYNC_FAULT`, if any.
    pub fn from_env() -> Fault {
        match std::env::var(Self::ENV).as_deref() {
            Ok("alter-relayed") => Fault::AlterRelayed,
            Ok("garbage-frames") => Fault::GarbageFrames,
            Ok("truncated-frames") => Fault::TruncatedFrames,
            Ok("oversized-frames") => Fault::OversizedFrames,
            Ok("ignore-policy") => Fault::IgnorePolicy,
            _ => Fault::None,
        }
    }
}

/// What arrives on a sync stream: a message, or the reason its frame was unusable. The codec
/// never fails a read, because request-response drops a failed inbound read without telling
/// anyone which peer sent it; a `Bad` frame instead reaches the node, which logs it and drops
/// that peer's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Message(Message),
    Bad(String),
}

/// Frames and bytes that crossed the wire, counted by the codec since the node started.
#[derive(Debug, Default)]
pub struct NetCounters {
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// A reading of [`NetCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetTotals {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl NetCounters {
    pub fn totals(&self) -> NetTotals {
        NetTotals {
            frames_in: self.frames_in.load(Ordering::Relaxed),
            frames_out: self.frames_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// Reads and writes [`Message`] frames on request-response streams.
#[derive(Debug, Clone, Default)]
pub struct FrameCodec {
    fault: Fault,
    counters: Arc<NetCounters>,
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Message> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    io.read_exact(&mut header).await?;
    let len = wire::frame_len(header).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    wire::decode_body(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl FrameCodec {
    async fn read_counted<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Frame> {
        let mut counted = CountingReader {
            inner: io,
            bytes: 0,
        };
        let frame = read_any(&mut counted).await;
        self.counters.frames_in.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_in
            .fetch_add(counted.bytes, Ordering::Relaxed);
        frame
    }
}

/// Counts the bytes read through it.
struct CountingReader<'a, T> {
    inner: &'a mut T,
    bytes: u64,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingReader<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            this.bytes += *n as u64;
        }
        poll
    }
}

impl FrameCodec {
    async fn write_frame<T: AsyncWrite + Unpin + Send>(
        &self,
        io: &mut T,
        msg: &Message,
    ) -> io::Result<()> {
        let frame =
            wire::encode(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        match self.fault {
            Fault::GarbageFrames => {
                let mut garbage = frame.clone();
                for (i, b) in garbage.iter_mut().enumerate().skip(FRAME_HEADER_BYTES) {
                    *b = (i as u8).wrapping_mul(31).wrapping_add(0x5a);
                }
                io.write_all(&garbage).await?;
            }
            Fault::TruncatedFrames => {
                io.write_all(&frame[..FRAME_HEADER_BYTES + (frame.len() - FRAME_HEADER_BYTES) / 2])
                    .await?;
            }
            Fault::OversizedFrames => {
                io.write_all(&((MAX_FRAME_BYTES + 1) as u32).to_be_bytes())
                    .await?;
                io.write_all(&frame[FRAME_HEADER_BYTES..]).await?;
            }
            Fault::None | Fault::AlterRelayed | Fault::IgnorePolicy => io.write_all(&frame).await?,
        }
        self.counters.frames_out.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_out
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        io.close().await
    }
}

async fn read_any<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Frame> {
    Ok(match read_frame(io).await {
        Ok(msg) => Frame::Message(msg),
        Err(e) => Frame::Bad(e.to_string()),
    })
}

impl FrameCodec {
    async fn write_any<T: AsyncWrite + Unpin + Send>(
        &self,
        io: &mut T,
        frame: &Frame,
    ) -> io::Result<()> {
        match frame {
            Frame::Message(msg) => self.write_frame(io, msg).await,
            Frame::Bad(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a bad frame is never sent",
            )),
        }
    }
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Frame;
    type Response = Frame;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Frame> {
        self.read_counted(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Frame> {
        self.read_counted(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Frame,
    ) -> io::Result<()> {
        self.write_any(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Frame,
    ) -> io::Result<()> {
        self.write_any(io, &res).await
    }
}

/// The node's libp2p behaviours.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Only configured peers may connect: others are refused once Noise has proven who they
    /// are, before any protocol stream opens.
    pub allow: allow_block_list::Behaviour<AllowedPeers>,
    pub sync: request_response::Behaviour<FrameCodec>,
    pub ping: ping::Behaviour,
}

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot set up the libp2p transport: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {detail}")]
    Listen {
        addr: libp2p::Multiaddr,
        detail: String,
    },
}

/// Build the swarm for `identity`; its PeerId is the node id.
pub fn build_swarm(
    identity: &Identity,
    fault: Fault,
    counters: Arc<NetCounters>,
) -> Result<Swarm<Behaviour>, NetError> {
    let protocol = StreamProtocol::new(PROTOCOL);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity.libp2p_keypair())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_behaviour(|_| Behaviour {
            allow: allow_block_list::Behaviour::default(),
            sync: request_response::Behaviour::with_codec(
                FrameCodec { fault, counters },
                [(protocol, ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS)),
            ),
            ping: ping::Behaviour::default(),
        })
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(IDLE_CONNECTION_TIMEOUT_SECS))
        })
        .build();
    Ok(swarm)
}

/// Delay before redial number `attempt` (0-based): exponential from
/// [`RECONNECT_BACKOFF_MIN_MS`], capped at [`RECONNECT_BACKOFF_MAX_MS`], with ±50 % jitter so
/// that peers that lost a hub together do not redial it together.
pub fn backoff_ms(attempt: u32, rng: &mut impl Rng) -> u64 {
    let base = RECONNECT_BACKOFF_MIN_MS
        .saturating_mul(1u64 << attempt.min(20))
        .min(RECONNECT_BACKOFF_MAX_MS);
    let jittered = base / 2 + rng.random_range(0..=base);
    jittered.min(RECONNECT_BACKOFF_MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let first: Vec<u64> = (0..20).map(|_| backoff_ms(0, &mut rng)).collect();
        assert!(first.iter().all(|d| {
            (RECONNECT_BACKOFF_MIN_MS / 2..=RECONNECT_BACKOFF_MIN_MS * 3 / 2).contains(d)
        }));
        assert!(
            first.iter().any(|d| *d != first[0]),
            "jitter varies the delay"
        );
        assert!(backoff_ms(4, &mut rng) > RECONNECT_BACKOFF_MIN_MS * 4);
        for attempt in [10, 30, 1000] {
            assert!(backoff_ms(attempt, &mut rng) <= RECONNECT_BACKOFF_MAX_MS);
        }
    }

    // Regression: garbage, truncated and oversized frames from a peer went unnoticed, because
    // libp2p request-response drops a failed inbound read with only a debug log and no event.
    // The codec now never fails a read: a bad frame arrives as `Frame::Bad`, with the peer.
    #[tokio::test]
    async fn frames_are_read_back_and_oversized_ones_refused_before_buffering() {
        let msg = Message::Ack {
            batch: 1,
            upto: 9,
            rejected: 1,
        };
        let mut buf = Vec::new();
        FrameCodec::default()
            .write_frame(&mut futures::io::Cursor::new(&mut buf), &msg)
            .await
            .unwrap();
        assert_eq!(
            read_frame(&mut futures::io::Cursor::new(&buf))
                .await
                .unwrap(),
            msg
        );
        for fault in [
            Fault::GarbageFrames,
            Fault::TruncatedFrames,
            Fault::OversizedFrames,
        ] {
            let mut bad = Vec::new();
            FrameCodec {
                fault,
                ..FrameCodec::default()
            }
            .write_frame(&mut futures::io::Cursor::new(&mut bad), &msg)
            .await
            .unwrap();
            assert!(
                read_frame(&mut futures::io::Cursor::new(&bad))
                    .await
                    .is_err(),
                "{fault:?}"
            );
            assert!(
                matches!(
                    read_any(&mut futures::io::Cursor::new(&bad)).await.unwrap(),
                    Frame::Bad(_)
                ),
                "{fault:?}"
            );
        }
    }
}
