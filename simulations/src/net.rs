//! The simulated network: links between nodes, connections over them, and a queue of requests,
//! responses and failures in flight, which a seeded RNG delays, reorders, duplicates and drops.
//!
//! It keeps the semantics of the node's libp2p request-response shell: every request is
//! answered by one response or, when the request or its response is lost, by a failure at the
//! sender after `REQUEST_TIMEOUT_MS`; a closed connection loses everything in flight on it and
//! nothing from it is delivered to a later connection.

use std::collections::{BTreeMap, BTreeSet};

use rand::RngExt;
use rand::rngs::StdRng;
use tidesync_proto::Message;

/// Simulated milliseconds after which a request with no response fails at its sender.
pub const REQUEST_TIMEOUT_MS: i64 = 200;

/// How the network misbehaves while the world runs (none during the heal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetFaults {
    /// Most simulated milliseconds a message takes; each takes 1 ..= this, so messages on one
    /// link overtake each other.
    pub max_delay_ms: i64,
    /// Chance that a request or a response is lost, in thousandths.
    pub drop_per_mille: u32,
    /// Chance that a request is delivered twice, in thousandths.
    pub dup_per_mille: u32,
}

impl NetFaults {
    /// A perfect network: the heal phase.
    pub const NONE: NetFaults = NetFaults {
        max_delay_ms: 1,
        drop_per_mille: 0,
        dup_per_mille: 0,
    };
}

/// What travels.
#[derive(Debug, Clone)]
pub enum Packet {
    Request {
        id: u64,
        msg: Message,
    },
    Response {
        id: u64,
        msg: Message,
    },
    /// The sender's request `id` got no response in time.
    Failed {
        id: u64,
    },
}

/// One packet in flight: from node `from` to node `to` over connection `conn` of `link`.
#[derive(Debug, Clone)]
pub struct Event {
    pub link: usize,
    pub conn: u64,
    pub from: usize,
    pub to: usize,
    pub packet: Packet,
}

/// One link between two nodes.
#[derive(Debug, Clone)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    /// Down (partitioned, or a ship away) until this step.
    pub down_until: u32,
    /// The current connection's number, if connected.
    pub conn: Option<u64>,
    /// Requests sent over the current connection and not yet answered or failed.
    outstanding: BTreeSet<u64>,
}

impl Link {
    pub fn other(&self, me: usize) -> usize {
        if me == self.a { self.b } else { self.a }
    }
}

/// Links and the packets in flight.
#[derive(Debug)]
pub struct Net {
    pub links: Vec<Link>,
    pub faults: NetFaults,
    /// In flight, by (delivery time, sending order): equal times keep their order.
    queue: BTreeMap<(i64, u64), Event>,
    next: u64,
    next_conn: u64,
    /// Messages handed to the network, and those lost, duplicated.
    pub sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

impl Net {
    pub fn new(links: &[(usize, usize)], faults: NetFaults) -> Net {
        Net {
            links: links
                .iter()
                .map(|&(a, b)| Link {
                    a,
                    b,
                    down_until: 0,
                    conn: None,
                    outstanding: BTreeSet::new(),
                })
                .collect(),
            faults,
            queue: BTreeMap::new(),
            next: 0,
            next_conn: 0,
            sent: 0,
            dropped: 0,
            duplicated: 0,
        }
    }

    /// The link between `a` and `b`, if there is one.
    pub fn link_between(&self, a: usize, b: usize) -> Option<usize> {
        self.links
            .iter()
            .position(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a))
    }

    /// Open a new connection on `link`; returns its number.
    pub fn connect(&mut self, link: usize) -> u64 {
        self.next_conn += 1;
        let l = &mut self.links[link];
        l.conn = Some(self.next_conn);
        l.outstanding.clear();
        self.next_conn
    }

    /// Close `link`'s connection: what is in flight on it is lost.
    pub fn disconnect(&mut self, link: usize) {
        let l = &mut self.links[link];
        l.conn = None;
        l.outstanding.clear();
    }

    fn push(
        &mut self,
        at: i64,
        link: usize,
        conn: u64,
        (from, to): (usize, usize),
        packet: Packet,
    ) {
        self.next += 1;
        let event = Event {
            link,
            conn,
            from,
            to,
            packet,
        };
        self.queue.insert((at, self.next), event);
    }

    fn delay(&self, rng: &mut StdRng) -> i64 {
        rng.random_range(1..=self.faults.max_delay_ms.max(1))
    }

    fn lost(&self, rng: &mut StdRng) -> bool {
        self.faults.drop_per_mille > 0 && rng.random_range(0..1000) < self.faults.drop_per_mille
    }

    /// Send a request from `from` to `to` at time `now`. False when they are not connected
    /// (the node has no session then, so this does not happen in a correct world).
    pub fn request(
        &mut self,
        rng: &mut StdRng,
        now: i64,
        from: usize,
        to: usize,
        msg: Message,
    ) -> bool {
        let Some(link) = self.link_between(from, to) else {
            return false;
        };
        let Some(conn) = self.links[link].conn else {
            return false;
        };
        self.sent += 1;
        self.next += 1;
        let id = self.next;
        self.links[link].outstanding.insert(id);
        if self.lost(rng) {
            self.dropped += 1;
            let failed = Packet::Failed { id };
            self.push(now + REQUEST_TIMEOUT_MS, link, conn, (to, from), failed);
            return true;
        }
        let copies = if self.faults.dup_per_mille > 0
            && rng.random_range(0..1000) < self.faults.dup_per_mille
        {
            self.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = now + self.delay(rng);
            let packet = Packet::Request {
                id,
                msg: msg.clone(),
            };
            self.push(at, link, conn, (from, to), packet);
        }
        true
    }

    /// Answer request `id` (delivered by `request_event`) with `msg`, at time `now`.
    pub fn respond(&mut self, rng: &mut StdRng, now: i64, request_event: &Event, msg: Message) {
        let (link, conn, from, to) = (
            request_event.link,
            request_event.conn,
            request_event.to,
            request_event.from,
        );
        let Packet::Request { id, .. } = request_event.packet else {
            return;
        };
        self.sent += 1;
        let (at, packet) = if self.lost(rng) {
            self.dropped += 1;
            (now + REQUEST_TIMEOUT_MS, Packet::Failed { id })
        } else {
            (now + self.delay(rng), Packet::Response { id, msg })
        };
        self.push(at, link, conn, (from, to), packet);
    }

    /// The next packet due by `now` that still belongs to a live connection, with responses
    /// and failures taken only once per request.
    pub fn pop_due(&mut self, now: i64) -> Option<Event> {
        loop {
            let key = *self.queue.keys().next()?;
            if key.0 > now {
                return None;
            }
            let event = self.queue.remove(&key)?;
            let link = &mut self.links[event.link];
            if link.conn != Some(event.conn) {
                continue;
            }
            match &event.packet {
                Packet::Request { .. } => return Some(event),
                Packet::Response { id, .. } | Packet::Failed { id } => {
                    if link.outstanding.remove(id) {
                        return Some(event);
                    }
                }
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}
