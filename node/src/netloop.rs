//! The network actor: it polls the libp2p swarm, dials the configured peers and passes sync
//! traffic to and from the node actor. It never waits for the core, so connections, other
//! peers and handshakes keep moving while the node actor verifies, applies or commits.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm, request_response};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tidesync_proto::NodeId;
use tidesync_proto::files::{FileAnswer, FileAsk};
use tidesync_proto::wire::Message;
use tokio::sync::{mpsc, watch};

use crate::config::PeerConfig;
use crate::net::{Behaviour, BehaviourEvent, DIAL_TICK_MS, Frame, backoff_ms};
use crate::netfiles::FileFrame;

/// Events that may wait in the node actor's queue before the network actor keeps them in its
/// own backlog.
pub const NET_EVENT_QUEUE_LEN: usize = 1_024;
/// Commands from the node actor that may wait for the network actor.
pub const NET_COMMAND_QUEUE_LEN: usize = 1_024;
/// Most events the network actor keeps while the node actor is behind. Past it, the swarm is
/// not polled until the node actor catches up: nothing is dropped, and libp2p's own buffers
/// and the per-connection stream caps push back on the peers.
pub const MAX_NET_BACKLOG: usize = 4_096;

/// How long a request we could not store (a local failure) stays unanswered before its
/// stream is closed, in seconds: the peer then sends it again, at most this often, and keeps
/// its connection.
pub const LOCAL_FAILURE_RETRY_SECS: u64 = 5;

/// Most addresses kept per configured peer from mDNS: a hostile host on the LAN may announce
/// any number of addresses under a configured peer's id (Noise refuses it on dial, but the
/// list must not grow).
pub const MAX_DISCOVERED_ADDRS_PER_PEER: usize = 8;
/// Most unconfigured peers remembered as discovered (to count each once); past it they are
/// still refused, and counted no more.
pub const MAX_DISCOVERED_STRANGERS: usize = 1_024;

/// Which inbound request a response answers.
pub type InboundId = u64;

/// What the network actor tells the node actor, in the order it happened.
#[derive(Debug)]
pub enum NetEvent {
    /// A configured peer's first connection is up, over this transport.
    Connected {
        peer: NodeId,
        via: Option<crate::link::Transport>,
    },
    /// A peer's last connection closed.
    Disconnected(NodeId),
    /// A configured peer asks; answer with [`NetCommand::Respond`] or
    /// [`NetCommand::Disconnect`].
    Request {
        peer: NodeId,
        id: InboundId,
        msg: Message,
    },
    /// A peer answered one of our requests.
    Response { peer: NodeId, msg: Message },
    /// One of our requests to the peer failed (timeout, closed stream, dropped connection).
    RequestFailed(NodeId),
    /// A configured peer asks for a file segment; answer with [`NetCommand::AnswerFile`].
    FileAsked {
        peer: NodeId,
        id: InboundId,
        ask: FileAsk,
    },
    /// A peer answered a segment ask of ours.
    FileAnswered {
        peer: NodeId,
        ask: FileAsk,
        answer: FileAnswer,
    },
    /// A segment ask of ours failed on the way.
    FileAskFailed {
        peer: NodeId,
        ask: FileAsk,
        why: String,
    },
}

/// What the node actor asks of the network actor.
#[derive(Debug)]
pub enum NetCommand {
    /// Send these requests.
    Send(Vec<(NodeId, Message)>),
    /// Answer an inbound request.
    Respond { id: InboundId, msg: Message },
    /// Leave an inbound request unanswered for [`LOCAL_FAILURE_RETRY_SECS`], then close its
    /// stream: we failed to store it, the peer did nothing wrong and sends it again.
    Abandon { id: InboundId },
    /// Close the connections of a peer that broke the protocol; its open request is dropped.
    Disconnect {
        peer: NodeId,
        id: Option<InboundId>,
        why: String,
    },
    /// Add or update a configured peer, and dial it.
    SetLink { id: NodeId, config: Box<PeerConfig> },
    /// Forget a peer: refuse and close its connections.
    DropLink(NodeId),
    /// Ask peers for file segments.
    AskFiles(Vec<(NodeId, FileAsk)>),
    /// Answer a segment ask.
    AnswerFile { id: InboundId, answer: FileAnswer },
}

/// What status shows of the network: the listen addresses and the refused connections.
#[derive(Debug, Clone, Default)]
pub struct NetState {
    pub listen: Vec<String>,
    /// Incoming connections refused (peer not configured, or over the connection limits),
    /// since start.
    pub refused: u64,
    /// Peers that are not configured found by mDNS, since start: never dialled, refused if
    /// they dial us.
    pub discovered_strangers: u64,
    /// Configured peers found by mDNS, since start.
    pub discovered_peers: u64,
}

/// A configured peer, as the network actor tracks it.
struct PeerLink {
    config: PeerConfig,
    peer_id: PeerId,
    connected: bool,
    /// Addresses mDNS found for the peer, tried after the configured ones (at most
    /// [`MAX_DISCOVERED_ADDRS_PER_PEER`]).
    discovered: Vec<Multiaddr>,
    /// Redials since the last successful connection.
    attempt: u32,
    next_dial: Instant,
}

/// The network actor's private state and loop.
pub struct NetActor {
    swarm: Swarm<Behaviour>,
    links: HashMap<NodeId, PeerLink>,
    commands: mpsc::Receiver<NetCommand>,
    events: mpsc::Sender<NetEvent>,
    /// Events the node actor's queue had no room for yet, oldest first.
    backlog: VecDeque<NetEvent>,
    /// Inbound requests waiting for the node actor's answer.
    open: HashMap<InboundId, (NodeId, request_response::ResponseChannel<Frame>)>,
    next_id: InboundId,
    /// Abandoned requests and when their streams close, oldest first.
    abandoned: VecDeque<(Instant, request_response::ResponseChannel<Frame>)>,
    /// Inbound segment asks waiting for the node actor's answer.
    open_files: HashMap<
        InboundId,
        (
            NodeId,
            request_response::ResponseChannel<FileFrame<FileAnswer>>,
        ),
    >,
    /// Our segment asks in flight.
    asked: HashMap<request_response::OutboundRequestId, FileAsk>,
    state: watch::Sender<NetState>,
    rng: StdRng,
    /// libp2p's own connection metrics (served at `GET /metrics`).
    metrics: libp2p::metrics::Metrics,
    /// Unconfigured peers mDNS found, with their addresses (at most
    /// [`MAX_DISCOVERED_STRANGERS`], each with at most [`MAX_DISCOVERED_ADDRS_PER_PEER`]):
    /// a peer configured later starts with them.
    strangers: HashMap<PeerId, Vec<Multiaddr>>,
}

/// The two ends the node actor holds: its event queue and the command sender.
pub struct NetEnds {
    pub events: mpsc::Receiver<NetEvent>,
    pub commands: mpsc::Sender<NetCommand>,
    pub state: watch::Receiver<NetState>,
}

impl NetActor {
    /// A network actor over `swarm`, with the configured peers `peers`.
    pub fn new(
        swarm: Swarm<Behaviour>,
        peers: &[(NodeId, PeerConfig)],
        metrics: libp2p::metrics::Metrics,
    ) -> (NetActor, NetEnds) {
        let (events_tx, events) = mpsc::channel(NET_EVENT_QUEUE_LEN);
        let (commands, commands_rx) = mpsc::channel(NET_COMMAND_QUEUE_LEN);
        let (state_tx, state) = watch::channel(NetState::default());
        let mut actor = NetActor {
            swarm,
            links: HashMap::new(),
            commands: commands_rx,
            events: events_tx,
            backlog: VecDeque::new(),
            open: HashMap::new(),
            next_id: 0,
            abandoned: VecDeque::new(),
            open_files: HashMap::new(),
            asked: HashMap::new(),
            state: state_tx,
            rng: StdRng::from_rng(&mut rand::rng()),
            metrics,
            strangers: HashMap::new(),
        };
        for (id, config) in peers {
            actor.add_link(config.clone(), *id);
        }
        (
            actor,
            NetEnds {
                events,
                commands,
                state,
            },
        )
    }

    /// Run until `shutdown` turns true or the node actor drops its command sender.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(DIAL_TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let polling = self.backlog.len() < MAX_NET_BACKLOG;
            let behind = !self.backlog.is_empty();
            let events = self.events.clone();
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                permit = events.reserve(), if behind => match permit {
                    Ok(permit) => {
                        if let Some(event) = self.backlog.pop_front() {
                            permit.send(event);
                        }
                    }
                    Err(_) => break,
                },
                event = self.swarm.select_next_some(), if polling => self.on_swarm_event(event),
                _ = tick.tick() => self.on_tick(),
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        tracing::info!("network actor stopped");
    }

    /// Pass an event on to the node actor without waiting: into its queue, or into the
    /// backlog behind the events already waiting there.
    fn emit(&mut self, event: NetEvent) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(event);
            return;
        }
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => self.backlog.push_back(event),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn on_command(&mut self, command: NetCommand) {
        match command {
            NetCommand::Send(out) => {
                for (peer, msg) in out {
                    if let Some(link) = self.links.get(&peer) {
                        let peer_id = link.peer_id;
                        self.swarm
                            .behaviour_mut()
                            .sync
                            .send_request(&peer_id, Frame::Message(msg));
                    }
                }
            }
            NetCommand::Respond { id, msg } => {
                if let Some((_, channel)) = self.open.remove(&id) {
                    // Fails only when the peer has gone; its next session starts over.
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_response(channel, Frame::Message(msg));
                }
            }
            NetCommand::Abandon { id } => {
                if let Some((_, channel)) = self.open.remove(&id) {
                    let due = Instant::now() + Duration::from_secs(LOCAL_FAILURE_RETRY_SECS);
                    self.abandoned.push_back((due, channel));
                }
            }
            NetCommand::Disconnect { peer, id, why } => {
                if let Some(id) = id {
                    self.open.remove(&id);
                }
                if let Some(peer_id) = peer.to_peer_id() {
                    self.drop_bad_peer(peer_id, "broke the protocol", &why);
                }
            }
            NetCommand::AskFiles(asks) => {
                for (peer, ask) in asks {
                    match self.links.get(&peer) {
                        Some(link) => {
                            let peer_id = link.peer_id;
                            let id = self
                                .swarm
                                .behaviour_mut()
                                .files
                                .send_request(&peer_id, FileFrame::Message(ask));
                            self.asked.insert(id, ask);
                        }
                        None => self.emit(NetEvent::FileAskFailed {
                            peer,
                            ask,
                            why: "not a configured peer".into(),
                        }),
                    }
                }
            }
            NetCommand::AnswerFile { id, answer } => {
                if let Some((_, channel)) = self.open_files.remove(&id) {
                    // Fails only when the peer has gone.
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .files
                        .send_response(channel, FileFrame::Message(answer));
                }
            }
            NetCommand::SetLink { id, config } => self.add_link(*config, id),
            NetCommand::DropLink(id) => self.drop_link(&id),
        }
    }

    fn add_link(&mut self, config: PeerConfig, id: NodeId) {
        let Some(peer_id) = id.to_peer_id() else {
            return;
        };
        self.swarm.behaviour_mut().allow.allow_peer(peer_id);
        let connected = self.swarm.is_connected(&peer_id);
        let found = self.strangers.remove(&peer_id).unwrap_or_default();
        if !found.is_empty() {
            self.state.send_modify(|s| s.discovered_peers += 1);
        }
        let link = self.links.entry(id).or_insert(PeerLink {
            config: config.clone(),
            peer_id,
            connected,
            discovered: Vec::new(),
            attempt: 0,
            next_dial: Instant::now(),
        });
        link.config = config;
        for addr in found {
            if !link.discovered.contains(&addr)
                && link.discovered.len() < MAX_DISCOVERED_ADDRS_PER_PEER
            {
                link.discovered.push(addr);
            }
        }
        link.next_dial = Instant::now();
        // Dial now rather than at the next tick.
        self.on_tick();
    }

    fn drop_link(&mut self, id: &NodeId) {
        if let Some(link) = self.links.remove(id) {
            self.swarm.behaviour_mut().allow.disallow_peer(link.peer_id);
            let _ = self.swarm.disconnect_peer_id(link.peer_id);
            self.open.retain(|_, (peer, _)| peer != id);
            self.open_files.retain(|_, (peer, _)| peer != id);
        }
    }

    /// Dial the configured peers that are down and due, and close the abandoned requests'
    /// streams that are due.
    fn on_tick(&mut self) {
        let now = Instant::now();
        while self.abandoned.front().is_some_and(|(due, _)| *due <= now) {
            self.abandoned.pop_front();
        }
        for link in self.links.values_mut() {
            if link.connected
                || (link.config.addrs.is_empty() && link.discovered.is_empty())
                || link.next_dial > now
            {
                continue;
            }
            let delay = backoff_ms(link.attempt, &mut self.rng);
            link.attempt = link.attempt.saturating_add(1);
            link.next_dial = now + Duration::from_millis(delay);
            let mut addrs: Vec<_> = link
                .config
                .addrs
                .iter()
                .chain(&link.discovered)
                .cloned()
                .collect();
            let mut opts = DialOpts::peer_id(link.peer_id);
            if let Some(prefer) = link.config.policy.link.prefer {
                // The preferred transport's addresses first, one address at a time, so that
                // the others are tried only when those fail.
                addrs.sort_by_key(|a| crate::link::Transport::of(a) != Some(prefer));
                opts = opts.override_dial_concurrency_factor(std::num::NonZeroU8::MIN);
            }
            let opts = opts
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(peer = %link.config.name, error = %e, "dial not started");
            }
        }
    }

    /// The configured peer behind `peer`, if it is one.
    fn configured(&self, peer: &PeerId) -> Option<NodeId> {
        NodeId::from_peer_id(peer).filter(|id| self.links.contains_key(id))
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        libp2p::metrics::Recorder::record(&self.metrics, &event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening for peers");
                self.state
                    .send_modify(|s| s.listen.push(address.to_string()));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                let Some(id) = self.configured(&peer_id) else {
                    tracing::warn!(%peer_id, "closing a connection from a peer that is not configured");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                };
                if let Some(link) = self.links.get_mut(&id) {
                    link.connected = true;
                    link.attempt = 0;
                }
                if num_established.get() == 1 {
                    let via = crate::link::Transport::of(endpoint.get_remote_address());
                    tracing::info!(peer = %id, via = via.map_or("?", |t| t.name()), "peer connected");
                    self.emit(NetEvent::Connected { peer: id, via });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                if let Some(id) = NodeId::from_peer_id(&peer_id) {
                    self.open.retain(|_, (peer, _)| *peer != id);
                    self.open_files.retain(|_, (peer, _)| *peer != id);
                    if let Some(link) = self.links.get_mut(&id) {
                        link.connected = false;
                        tracing::info!(peer = %id, cause = ?cause.map(|c| c.to_string()), "peer disconnected");
                    }
                    self.emit(NetEvent::Disconnected(id));
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    self.state.send_modify(|s| s.refused += 1);
                }
                tracing::warn!(from = %send_back_addr, error = %error, "refused an incoming connection");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Files(event)) => self.on_files_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(event)) => self.on_mdns_event(event),
            _ => {}
        }
    }

    /// mDNS found or lost addresses. Discovery is never authorisation: an address is kept
    /// only for a configured peer (and dialled at once if it is down); any other peer is
    /// counted once and never dialled.
    fn on_mdns_event(&mut self, event: libp2p::mdns::Event) {
        match event {
            libp2p::mdns::Event::Discovered(found) => {
                for (peer_id, addr) in found {
                    let Some(id) = self.configured(&peer_id) else {
                        if let Some(addrs) = self.strangers.get_mut(&peer_id) {
                            if !addrs.contains(&addr) && addrs.len() < MAX_DISCOVERED_ADDRS_PER_PEER
                            {
                                addrs.push(addr);
                            }
                        } else if self.strangers.len() < MAX_DISCOVERED_STRANGERS {
                            tracing::info!(%peer_id, %addr, "mDNS found a node that is not configured; it will not be dialled");
                            self.strangers.insert(peer_id, vec![addr]);
                            self.state.send_modify(|s| s.discovered_strangers += 1);
                        }
                        continue;
                    };
                    let Some(link) = self.links.get_mut(&id) else {
                        continue;
                    };
                    if link.discovered.contains(&addr)
                        || link.discovered.len() >= MAX_DISCOVERED_ADDRS_PER_PEER
                    {
                        continue;
                    }
                    tracing::info!(peer = %link.config.name, %addr, "mDNS found a configured peer");
                    if link.discovered.is_empty() {
                        self.state.send_modify(|s| s.discovered_peers += 1);
                    }
                    link.discovered.push(addr);
                    if !link.connected {
                        link.next_dial = Instant::now();
                    }
                }
                self.on_tick();
            }
            libp2p::mdns::Event::Expired(gone) => {
                for (peer_id, addr) in gone {
                    if let Some(link) = self
                        .configured(&peer_id)
                        .and_then(|id| self.links.get_mut(&id))
                    {
                        link.discovered.retain(|a| *a != addr);
                    }
                }
            }
        }
    }

    /// Log a peer that broke the protocol and drop its connection; the node carries on.
    /// A number for the next inbound request, sync or files.
    fn next_inbound(&mut self) -> InboundId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn drop_bad_peer(&mut self, peer: PeerId, why: &str, detail: &str) {
        tracing::warn!(%peer, error = %detail, "dropping the connection to a peer that {why}");
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn on_sync_event(&mut self, event: request_response::Event<Frame, Frame>) {
        use request_response::{Event, Message as Rr};
        match event {
            Event::Message { peer, message, .. } => {
                let Some(id) = self.configured(&peer) else {
                    let _ = self.swarm.disconnect_peer_id(peer);
                    return;
                };
                match message {
                    Rr::Request {
                        request: Frame::Message(msg),
                        channel,
                        ..
                    } => {
                        let inbound = self.next_inbound();
                        self.open.insert(inbound, (id, channel));
                        self.emit(NetEvent::Request {
                            peer: id,
                            id: inbound,
                            msg,
                        });
                    }
                    Rr::Response {
                        response: Frame::Message(msg),
                        ..
                    } => self.emit(NetEvent::Response { peer: id, msg }),
                    Rr::Request {
                        request: Frame::Bad(why),
                        ..
                    }
                    | Rr::Response {
                        response: Frame::Bad(why),
                        ..
                    } => self.drop_bad_peer(peer, "sent a bad frame", &why),
                }
            }
            Event::OutboundFailure { peer, error, .. } => {
                tracing::warn!(%peer, error = %error, "a request to the peer failed");
                if let Some(id) = NodeId::from_peer_id(&peer) {
                    self.emit(NetEvent::RequestFailed(id));
                }
            }
            Event::InboundFailure { peer, error, .. } => inbound_failed(&peer, &error),
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_files_event(
        &mut self,
        event: request_response::Event<FileFrame<FileAsk>, FileFrame<FileAnswer>>,
    ) {
        use request_response::{Event, Message as Rr};
        match event {
            Event::Message { peer, message, .. } => {
                let Some(id) = self.configured(&peer) else {
                    let _ = self.swarm.disconnect_peer_id(peer);
                    return;
                };
                match message {
                    Rr::Request {
                        request: FileFrame::Message(ask),
                        channel,
                        ..
                    } => {
                        let inbound = self.next_inbound();
                        self.open_files.insert(inbound, (id, channel));
                        self.emit(NetEvent::FileAsked {
                            peer: id,
                            id: inbound,
                            ask,
                        });
                    }
                    Rr::Response {
                        request_id,
                        response,
                    } => {
                        let Some(ask) = self.asked.remove(&request_id) else {
                            return;
                        };
                        match response {
                            FileFrame::Message(answer) => self.emit(NetEvent::FileAnswered {
                                peer: id,
                                ask,
                                answer,
                            }),
                            FileFrame::Bad(why) => {
                                self.emit(NetEvent::FileAskFailed {
                                    peer: id,
                                    ask,
                                    why: why.clone(),
                                });
                                self.drop_bad_peer(peer, "sent a bad file frame", &why);
                            }
                        }
                    }
                    Rr::Request {
                        request: FileFrame::Bad(why),
                        ..
                    } => self.drop_bad_peer(peer, "sent a bad file frame", &why),
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let (Some(ask), Some(id)) =
                    (self.asked.remove(&request_id), NodeId::from_peer_id(&peer))
                {
                    // A peer without the files protocol (an older build) has no files for us.
                    let why = error.to_string();
                    if matches!(
                        error,
                        request_response::OutboundFailure::UnsupportedProtocols
                    ) {
                        self.emit(NetEvent::FileAnswered {
                            peer: id,
                            ask,
                            answer: FileAnswer::Unknown,
                        });
                    } else {
                        self.emit(NetEvent::FileAskFailed { peer: id, ask, why });
                    }
                }
            }
            Event::InboundFailure { peer, error, .. } => inbound_failed(&peer, &error),
            Event::ResponseSent { .. } => {}
        }
    }
}

/// An inbound request (sync or files) failed: a stream past the cap, a timeout, a closed
/// connection, a request we left unanswered. None proves the peer wrong, so it keeps its
/// connection.
fn inbound_failed(peer: &PeerId, error: &request_response::InboundFailure) {
    if NodeId::from_peer_id(peer).is_none_or(|id| crate::ratelog::REFUSALS.allow(&id)) {
        tracing::debug!(%peer, error = %error, "an inbound request failed");
    }
}
