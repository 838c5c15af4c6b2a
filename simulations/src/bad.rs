//! The misbehaving node a world may have: how it misbehaves, switching that on in its core,
//! and the bogus messages it sends. The invariants check the honest nodes only.

use rand::{Rng, RngExt};
use tidesync::core::Core;
use tidesync::fault::{EngineFault, Fault};
use tidesync_proto::{Checkpoint, Message};

use crate::world::World;

/// Most `Changes` requests the misbehaving node keeps to replay.
pub const MAX_REPLAYS_KEPT: usize = 64;

/// How the one misbehaving node of a world misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Writes and sends as if it had no policy of its own (read-only types written, every
    /// type offered to every peer).
    IgnorePolicy,
    /// Sends the types its peers skip, as a node following references into them would.
    SendSkipped,
    /// Sends every other peer a signed twin of each of its own changes (same actor and
    /// sequence number, other contents).
    Equivocate,
    /// Sends Hellos that claim other nodes or impossible checkpoints, and Rewounds asking
    /// for logs from nowhere.
    BogusHellos,
    /// Sends old batches of its own again, out of order.
    Replay,
}

impl Misbehaviour {
    pub const ALL: [Misbehaviour; 5] = [
        Misbehaviour::IgnorePolicy,
        Misbehaviour::SendSkipped,
        Misbehaviour::Equivocate,
        Misbehaviour::BogusHellos,
        Misbehaviour::Replay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Misbehaviour::IgnorePolicy => "ignore-policy",
            Misbehaviour::SendSkipped => "send-skipped",
            Misbehaviour::Equivocate => "equivocate",
            Misbehaviour::BogusHellos => "bogus-hellos",
            Misbehaviour::Replay => "replay",
        }
    }

    /// Switch what the core itself does wrong on (the bogus messages come from [`act`]).
    pub(crate) fn switch_on(self, core: &mut Core) {
        match self {
            Misbehaviour::IgnorePolicy => core.inject_process_fault(Fault::IgnorePolicy),
            Misbehaviour::SendSkipped => core.inject_fault(EngineFault::IgnoreSkip),
            Misbehaviour::Equivocate => core.inject_process_fault(Fault::Equivocate),
            Misbehaviour::BogusHellos | Misbehaviour::Replay => {}
        }
    }
}

impl std::fmt::Display for Misbehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Misbehaviour {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Misbehaviour::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown misbehaviour {s:?} (known: ignore-policy, send-skipped, equivocate, bogus-hellos, replay)")
            })
    }
}

/// The misbehaving node sends one of its connected peers a bogus Hello or Rewound, or an
/// old batch again, as its misbehaviour has it.
pub(crate) fn act(w: &mut World) {
    let Some((b, kind)) = w.opts.bad else {
        return;
    };
    if w.nodes[b].core.is_none() {
        return;
    }
    let peers: Vec<usize> = w
        .neighbours(b)
        .into_iter()
        .filter(|&p| {
            w.net
                .link_between(b, p)
                .is_some_and(|l| w.net.links[l].conn.is_some())
        })
        .collect();
    if peers.is_empty() {
        return;
    }
    let to = peers[w.rng.random_range(0..peers.len())];
    let msg = match kind {
        Misbehaviour::BogusHellos => {
            let mut hash = [0u8; 32];
            w.rng.fill_bytes(&mut hash);
            let resume = Checkpoint {
                seq: w.rng.random_range(0..1_000_000),
                hash,
            };
            if w.rng.random_bool(0.5) {
                // Claims to be some node, maybe another one, with a log it does not have.
                let n = w.rng.random_range(0..w.nodes.len());
                let claimed = w.node_id(n);
                Message::Hello {
                    number: w.rng.next_u64(),
                    node: claimed,
                    name: w.layout.name(b),
                    resume,
                    tip: w.rng.next_u64(),
                }
            } else {
                Message::Rewound { resume }
            }
        }
        Misbehaviour::Replay => {
            let old: Vec<&(usize, Message)> = w.replays.iter().filter(|(t, _)| *t == to).collect();
            if old.is_empty() {
                return;
            }
            old[w.rng.random_range(0..old.len())].1.clone()
        }
        _ => return,
    };
    w.trace.line(&format!(
        "{} misbehave {b}->{to} {}",
        w.now,
        crate::shell::kind(&msg)
    ));
    w.net.request(&mut w.rng, w.now, b, to, msg);
}

/// Keep a `Changes` request the misbehaving node sent, to replay it later.
pub(crate) fn remember(w: &mut World, from: usize, to: usize, msg: &Message) {
    if w.opts
        .bad
        .is_some_and(|(b, k)| b == from && k == Misbehaviour::Replay)
        && matches!(msg, Message::Changes { .. })
    {
        if w.replays.len() >= MAX_REPLAYS_KEPT {
            let i = w.rng.random_range(0..w.replays.len());
            w.replays.swap_remove(i);
        }
        w.replays.push((to, msg.clone()));
    }
}
