//! The libp2p shell: TCP + Noise + Yamux with connection and stream limits, gating to
//! configured peers, the request-response sync protocol with its frame codec, reconnect
//! backoff; the frame faults of `fault::Fault` act in its codec.

pub use crate::fault::Fault;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{StreamProtocol, Swarm, mdns, noise, ping, tcp, yamux};
use rand::{Rng, RngExt};
use tidesync_proto::Message;
use tidesync_proto::wire::{self, FRAME_HEADER_BYTES, MAX_FRAME_BYTES};

use crate::identity::Identity;
use crate::model::NetTotals;

/// The sync protocol's libp2p name. It stays the same across protocol versions: every frame
/// carries `PROTOCOL_VERSION`, so two versions connect and each says which one it speaks.
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
/// How often mDNS asks the local network for peers, in seconds, besides the query at start and
/// on every new interface (libp2p's default is 5 minutes; a ship's laptop joins and leaves).
pub const MDNS_QUERY_INTERVAL_SECS: u64 = 30;
/// How long an mDNS record of ours is valid, in seconds.
pub const MDNS_TTL_SECS: u64 = 120;
/// How often the node checks for peers due a redial, in milliseconds.
pub const DIAL_TICK_MS: u64 = 100;
/// Longest a TCP connection may take, in seconds, from accept (or dial) to a finished
/// protocol negotiation, Noise handshake and Yamux setup, so that a socket that never speaks
/// holds its pending-connection slot only this long. libp2p 0.57's `SwarmBuilder` already
/// applies 10 s by default; it is set here by name so that it cannot change unnoticed.
pub const HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Most incoming connections that have not finished their handshake, all remotes together;
/// more are closed at once. With [`HANDSHAKE_TIMEOUT_SECS`] a flood of silent sockets holds
/// at most this many slots for at most that long, and never blocks our own dials to peers.
pub const MAX_PENDING_INCOMING_CONNECTIONS: u32 = 16;
/// Most established connections to one peer. Two, so that both sides dialing each other at
/// once is not refused; a session runs over all of them.
pub const MAX_CONNECTIONS_PER_PEER: u32 = 2;
/// Sync streams one side opens on a connection in honest use: `SYNC_WINDOW_BATCHES` (2)
/// batches, a Hello and a Rewound.
pub const MAX_SYNC_STREAMS_PER_DIRECTION: usize = 4;
/// Most sync streams open at once on one connection, inbound and outbound together
/// (request-response counts both in one limit; its default is 100). An inbound stream beyond
/// it is dropped unread and the peer's request fails. Each stream buffers at most one frame
/// (`MAX_FRAME_BYTES`), so this bounds what one connection can make us hold.
pub const MAX_SYNC_STREAMS_PER_CONNECTION: usize = 2 * MAX_SYNC_STREAMS_PER_DIRECTION;
/// Most inbound streams still negotiating their protocol on one connection (libp2p's default
/// is 128).
pub const MAX_NEGOTIATING_INBOUND_STREAMS: usize = 8;
/// Most Yamux streams on one connection, both directions and every protocol (Yamux's default
/// is 512). Each may buffer up to its 256 KiB receive window before it is read.
pub const MAX_YAMUX_STREAMS: usize = 48;
/// Bytes a QUIC connection may have received and not yet read, all streams together (its
/// flow-control window; QUIC's default in libp2p is 15 MB).
pub const QUIC_MAX_CONNECTION_DATA_BYTES: u32 = 16 * 1024 * 1024;
/// Bytes one QUIC stream may have received and not yet read: a whole file segment frame fits.
pub const QUIC_MAX_STREAM_DATA_BYTES: u32 = 4 * 1024 * 1024;
/// A QUIC connection that hears nothing (not even a keep-alive, sent every 5 s) for this long,
/// in milliseconds, is closed: long enough for a satellite's round trips and short drops.
pub const QUIC_IDLE_TIMEOUT_MS: u32 = 30_000;
// Honest use must fit the stream caps: both sides' window, Hello and Rewound at once, and the
// negotiating ones within Yamux's.
const _: () = assert!(
    MAX_SYNC_STREAMS_PER_DIRECTION >= crate::sync::SYNC_WINDOW_BATCHES + 2
        && MAX_YAMUX_STREAMS
            >= MAX_SYNC_STREAMS_PER_CONNECTION
                + crate::netfiles::MAX_FILE_STREAMS_PER_CONNECTION
                + MAX_NEGOTIATING_INBOUND_STREAMS
);
/// A frame body is read in pieces of at most this many bytes, so that a header that announces
/// a large frame costs memory only as its bytes actually arrive.
pub const FRAME_READ_CHUNK_BYTES: usize = 64 * 1024;

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
    pub(crate) file_bytes_in: AtomicU64,
    pub(crate) file_bytes_out: AtomicU64,
}

impl NetCounters {
    pub fn totals(&self) -> NetTotals {
        NetTotals {
            frames_in: self.frames_in.load(Ordering::Relaxed),
            frames_out: self.frames_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            file_bytes_in: self.file_bytes_in.load(Ordering::Relaxed),
            file_bytes_out: self.file_bytes_out.load(Ordering::Relaxed),
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
    let body = read_body(io, len).await?;
    wire::decode_body(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Read a frame body of `len` bytes (already checked against its protocol's limit). The
/// buffer grows as bytes arrive rather than trusting the announced length: a peer that
/// announces the largest frame and sends nothing costs one chunk, not the whole frame.
pub(crate) async fn read_body<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    len: usize,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    while body.len() < len {
        let start = body.len();
        body.resize(start + (len - start).min(FRAME_READ_CHUNK_BYTES), 0);
        let n = io.read(&mut body[start..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        body.truncate(start + n);
    }
    Ok(body)
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
            Fault::None
            | Fault::AlterRelayed
            | Fault::IgnorePolicy
            | Fault::Equivocate
            | Fault::CorruptFiles => io.write_all(&frame).await?,
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
    /// Caps on pending and established connections (see [`connection_limits_config`]).
    pub limits: connection_limits::Behaviour,
    /// Only configured peers may connect: others are refused once Noise has proven who they
    /// are, before any protocol stream opens.
    pub allow: allow_block_list::Behaviour<AllowedPeers>,
    pub sync: request_response::Behaviour<FrameCodec>,
    /// The files protocol (`crate::netfiles`), on streams of its own: file bytes never
    /// queue in front of a sync batch.
    pub files: request_response::Behaviour<crate::netfiles::FileCodec>,
    pub ping: ping::Behaviour,
    /// Local discovery (`discovery.mdns`), off unless configured: it only ever adds addresses
    /// of configured peers (see `crate::netloop`).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
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

/// The connection caps: pending incoming connections and connections per peer.
pub fn connection_limits_config() -> ConnectionLimits {
    ConnectionLimits::default()
        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING_CONNECTIONS))
        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
}

/// Yamux with at most [`MAX_YAMUX_STREAMS`] streams per connection.
fn yamux_config() -> yamux::Config {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(MAX_YAMUX_STREAMS);
    config
}

/// QUIC with the same caps as TCP: the handshake timeout, the streams per connection, and
/// what one connection (and one stream of it) may have in flight unread.
fn quic_config(mut config: libp2p::quic::Config) -> libp2p::quic::Config {
    config.handshake_timeout = Duration::from_secs(HANDSHAKE_TIMEOUT_SECS);
    config.max_concurrent_stream_limit = MAX_YAMUX_STREAMS as u32;
    config.max_connection_data = QUIC_MAX_CONNECTION_DATA_BYTES;
    config.max_stream_data = QUIC_MAX_STREAM_DATA_BYTES;
    config.max_idle_timeout = QUIC_IDLE_TIMEOUT_MS;
    config
}

/// Request-response settings of the sync protocol.
fn sync_config() -> request_response::Config {
    request_response::Config::default()
        .with_request_timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS))
        .with_max_concurrent_streams(MAX_SYNC_STREAMS_PER_CONNECTION)
}

/// Build the swarm for `identity`; its PeerId is the node id.
/// The node's swarm; with `mdns`, local discovery runs too.
pub fn build_swarm(
    identity: &Identity,
    fault: Fault,
    counters: Arc<NetCounters>,
    mdns: bool,
) -> Result<Swarm<Behaviour>, NetError> {
    build_swarm_with(identity, fault, counters, sync_config(), mdns)
}

/// [`build_swarm`] with the given request-response settings (tests build a peer that opens
/// more streams than ours would).
fn build_swarm_with(
    identity: &Identity,
    fault: Fault,
    counters: Arc<NetCounters>,
    sync: request_response::Config,
    mdns: bool,
) -> Result<Swarm<Behaviour>, NetError> {
    let protocol = StreamProtocol::new(PROTOCOL);
    let local = identity.libp2p_keypair().public().to_peer_id();
    let mdns = if mdns {
        let config = mdns::Config {
            ttl: Duration::from_secs(MDNS_TTL_SECS),
            query_interval: Duration::from_secs(MDNS_QUERY_INTERVAL_SECS),
            enable_ipv6: false,
        };
        let behaviour = mdns::tokio::Behaviour::new(config, local)
            .map_err(|e| NetError::Transport(format!("cannot start mDNS: {e}")))?;
        Some(behaviour)
    } else {
        None
    };
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity.libp2p_keypair())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux_config,
        )
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_quic_config(quic_config)
        .with_behaviour(|_| Behaviour {
            limits: connection_limits::Behaviour::new(connection_limits_config()),
            allow: allow_block_list::Behaviour::default(),
            sync: request_response::Behaviour::with_codec(
                FrameCodec {
                    fault,
                    counters: counters.clone(),
                },
                [(protocol, ProtocolSupport::Full)],
                sync,
            ),
            files: crate::netfiles::behaviour(counters, fault),
            ping: ping::Behaviour::default(),
            mdns: Toggle::from(mdns),
        })
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(IDLE_CONNECTION_TIMEOUT_SECS))
                .with_max_negotiating_inbound_streams(MAX_NEGOTIATING_INBOUND_STREAMS)
        })
        // The `TransportTimeout` the builder wraps around the whole transport: it bounds the
        // TCP upgrade (multistream-select, Noise, Yamux) of every connection.
        .with_connection_timeout(Duration::from_secs(HANDSHAKE_TIMEOUT_SECS))
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
    use futures::StreamExt;
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::SwarmEvent;
    use rand::SeedableRng;

    // Regression: request-response's default let one connection hold 100 sync streams, each
    // buffering up to `MAX_FRAME_BYTES` (800 MiB). A peer built to open many more streams than
    // ours gets at most `MAX_SYNC_STREAMS_PER_CONNECTION` read; the rest are dropped unread and
    // its requests fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_connection_gets_at_most_the_stream_cap_read() {
        let cap = MAX_SYNC_STREAMS_PER_CONNECTION;
        let sent = 3 * cap;
        let mut victim = build_swarm(
            &Identity::from_secret([1; 32]),
            Fault::None,
            Arc::default(),
            false,
        )
        .unwrap();
        let mut attacker = build_swarm_with(
            &Identity::from_secret([2; 32]),
            Fault::None,
            Arc::default(),
            request_response::Config::default().with_max_concurrent_streams(10 * sent),
            false,
        )
        .unwrap();
        let (v_peer, a_peer) = (*victim.local_peer_id(), *attacker.local_peer_id());
        victim.behaviour_mut().allow.allow_peer(a_peer);
        attacker.behaviour_mut().allow.allow_peer(v_peer);
        victim
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = victim.select_next_some().await {
                break address;
            }
        };
        attacker.dial(addr.with(Protocol::P2p(v_peer))).unwrap();
        let request = Frame::Message(Message::Ack {
            batch: 1,
            upto: 0,
            rejected: 0,
        });
        // Response channels are kept, so every stream the victim reads stays open.
        let mut held = Vec::new();
        let mut refused = 0;
        let deadline = tokio::time::sleep(Duration::from_secs(60));
        tokio::pin!(deadline);
        while held.len() + refused < sent {
            tokio::select! {
                _ = &mut deadline => panic!("stuck: {} read, {refused} refused", held.len()),
                e = victim.select_next_some() => {
                    if let SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message {
                        message: request_response::Message::Request { channel, .. },
                        ..
                    })) = e
                    {
                        held.push(channel);
                        assert!(held.len() <= cap, "more than {cap} streams read at once");
                    }
                }
                e = attacker.select_next_some() => match e {
                    SwarmEvent::ConnectionEstablished { .. } => {
                        for _ in 0..sent {
                            attacker.behaviour_mut().sync.send_request(&v_peer, request.clone());
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Sync(
                        request_response::Event::OutboundFailure { .. }
                        | request_response::Event::Message {
                            message: request_response::Message::Response { response: Frame::Bad(_), .. },
                            ..
                        },
                    )) => refused += 1,
                    _ => {}
                }
            }
        }
        assert_eq!((held.len(), refused), (cap, sent - cap));
    }

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
