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
                false,
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

/// A running hub, a running honest lab syncing with it (the hub already holds the lab's
/// `Sample/S-before`), and the home of mallory, a peer the hub has configured with `policy`
/// but that is not running: tests speak for it.
pub fn hub_lab_and_mallory(policy: &[&str]) -> (crate::TestNode, crate::TestNode, crate::TestNode) {
    hub_lab_and_mallory_on(&[], policy)
}

/// As [`hub_lab_and_mallory`], the hub initialised with `hub_init` (its listen addresses).
pub fn hub_lab_and_mallory_on(
    hub_init: &[&str],
    policy: &[&str],
) -> (crate::TestNode, crate::TestNode, crate::TestNode) {
    let mut hub = crate::TestNode::init_with("hub", hub_init);
    let mut lab = crate::TestNode::init("lab");
    let mallory = crate::TestNode::init("mallory");
    hub.start();
    lab.start();
    hub.add_peer(&lab, false);
    hub.add_peer_with(&mallory, false, policy);
    lab.add_peer(&hub, true);
    lab.ok(&["put", "Sample", "S-before", r#"{"status":"received"}"#]);
    crate::wait_for("the hub to receive the lab's sample", || {
        hub.get("Sample", "S-before").is_some()
    });
    (hub, lab, mallory)
}

/// After an attack on `hub`: it still answers its API, still has the lab's `S-before`, and
/// still receives the lab's new writes (`tag` names the new object).
pub fn assert_still_healthy(hub: &crate::TestNode, lab: &crate::TestNode, tag: &str) {
    assert!(hub.status()["node"].is_string(), "the hub's API answers");
    assert_eq!(
        hub.get("Sample", "S-before"),
        Some(serde_json::json!({"status":"received"}))
    );
    let id = format!("S-after-{tag}");
    lab.ok(&["put", "Sample", &id, r#"{"status":"analysed"}"#]);
    crate::wait_for("the hub to keep syncing with the lab", || {
        hub.get("Sample", &id).is_some()
    });
}
