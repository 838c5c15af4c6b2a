//! A hostile peer: a real libp2p node built on the node's own network shell and on `proto`,
//! holding the real key of a peer that the victim has configured, that speaks the sync
//! protocol and sends whatever frames a test crafts.

use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, request_response};
use tidesync::identity::Identity;
use tidesync::net::{BehaviourEvent, Fault, Frame, NetCounters, build_swarm};
use tidesync_proto::{Message, NodeId};

/// Longest the hostile peer waits for the victim to answer one request.
pub const ANSWER_TIMEOUT_SECS: u64 = 60;

/// What became of one request.
#[derive(Debug)]
pub enum Answer {
    Response(Message),
    Failed(String),
}

/// A connected hostile peer.
pub struct Mallory {
    pub identity: Identity,
    pub victim: NodeId,
    victim_peer: PeerId,
    swarm: Swarm<tidesync::net::Behaviour>,
    runtime: tokio::runtime::Runtime,
}

impl Mallory {
    /// Connect to `victim` (its id and libp2p address) as the node whose key is at `key_file`.
    pub fn connect(key_file: &std::path::Path, victim: NodeId, addr: &str) -> Mallory {
        let identity = Identity::load(key_file).expect("mallory's key");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let victim_peer = victim.to_peer_id().expect("a peer id");
        let addr: Multiaddr = addr.parse().expect("an address");
        let swarm = runtime.block_on(async {
            let mut swarm = build_swarm(
                &identity,
                Fault::None,
                std::sync::Arc::new(NetCounters::default()),
            )
            .expect("a swarm");
            swarm.behaviour_mut().allow.allow_peer(victim_peer);
            swarm.dial(addr).expect("dialing");
            let connected = tokio::time::timeout(Duration::from_secs(ANSWER_TIMEOUT_SECS), async {
                loop {
                    if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                        swarm.select_next_some().await
                        && peer_id == victim_peer
                    {
                        return;
                    }
                }
            })
            .await;
            assert!(connected.is_ok(), "mallory never connected");
            swarm
        });
        Mallory {
            identity,
            victim,
            victim_peer,
            swarm,
            runtime,
        }
    }

    pub fn me(&self) -> NodeId {
        self.identity.node_id()
    }

    /// Send every message at once (each on its own stream) and wait for what becomes of each,
    /// in order. The victim's own requests to us are answered with an Ack, as an honest peer
    /// would, so its session does not stall.
    pub fn send_all(&mut self, messages: Vec<Message>) -> Vec<Answer> {
        let Mallory {
            swarm,
            runtime,
            victim_peer,
            ..
        } = self;
        runtime.block_on(async {
            let ids: Vec<request_response::OutboundRequestId> = messages
                .into_iter()
                .map(|m| {
                    swarm
                        .behaviour_mut()
                        .sync
                        .send_request(victim_peer, Frame::Message(m))
                })
                .collect();
            let mut answers: Vec<Option<Answer>> = ids.iter().map(|_| None).collect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(ANSWER_TIMEOUT_SECS);
            while answers.iter().any(Option::is_none) {
                let event = tokio::time::timeout_at(deadline, swarm.select_next_some()).await;
                let Ok(event) = event else { break };
                let SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) = event else {
                    continue;
                };
                use request_response::{Event, Message as Rr};
                let (id, answer) = match event {
                    Event::Message {
                        message:
                            Rr::Response {
                                request_id,
                                response,
                            },
                        ..
                    } => match response {
                        Frame::Message(m) => (request_id, Answer::Response(m)),
                        Frame::Bad(why) => (request_id, Answer::Failed(why)),
                    },
                    Event::Message {
                        message: Rr::Request { channel, .. },
                        ..
                    } => {
                        let ack = Message::Ack {
                            batch: 0,
                            upto: 0,
                            rejected: 0,
                        };
                        let _ = swarm
                            .behaviour_mut()
                            .sync
                            .send_response(channel, Frame::Message(ack));
                        continue;
                    }
                    Event::OutboundFailure {
                        request_id, error, ..
                    } => (request_id, Answer::Failed(error.to_string())),
                    _ => continue,
                };
                if let Some(i) = ids.iter().position(|r| *r == id) {
                    answers[i] = Some(answer);
                }
            }
            answers
                .into_iter()
                .map(|a| a.unwrap_or_else(|| Answer::Failed("no answer in time".into())))
                .collect()
        })
    }
}
