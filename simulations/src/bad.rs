//! The misbehaving node a world may have: how it misbehaves, switching that on in its core,
//! and the bogus messages it sends. The invariants check the honest nodes only.

use rand::{Rng, RngExt};
use tidesync::core::Core;
use tidesync::fault::{EngineFault, Fault};
use tidesync_proto::{Checkpoint, Message, ObjectId, TypeName};

use crate::options::{Violation, fail};
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
    /// Writes into another lab's prefixed Samples (as held at the hub) and sends the hub the
    /// change, signed with its own key.
    WritesPrefixed,
}

impl Misbehaviour {
    pub const ALL: [Misbehaviour; 6] = [
        Misbehaviour::IgnorePolicy,
        Misbehaviour::SendSkipped,
        Misbehaviour::Equivocate,
        Misbehaviour::BogusHellos,
        Misbehaviour::Replay,
        Misbehaviour::WritesPrefixed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Misbehaviour::IgnorePolicy => "ignore-policy",
            Misbehaviour::SendSkipped => "send-skipped",
            Misbehaviour::Equivocate => "equivocate",
            Misbehaviour::BogusHellos => "bogus-hellos",
            Misbehaviour::Replay => "replay",
            Misbehaviour::WritesPrefixed => "writes-prefixed",
        }
    }

    /// Switch what the core itself does wrong on (the bogus messages come from [`act`]).
    pub(crate) fn switch_on(self, core: &mut Core) {
        match self {
            Misbehaviour::IgnorePolicy => core.inject_process_fault(Fault::IgnorePolicy),
            Misbehaviour::SendSkipped => core.inject_fault(EngineFault::IgnoreSkip),
            Misbehaviour::Equivocate => core.inject_process_fault(Fault::Equivocate),
            Misbehaviour::BogusHellos | Misbehaviour::Replay | Misbehaviour::WritesPrefixed => {}
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
                format!("unknown misbehaviour {s:?} (known: ignore-policy, send-skipped, equivocate, bogus-hellos, replay, writes-prefixed)")
            })
    }
}

/// The misbehaving node sends one of its connected peers a bogus Hello or Rewound, an old
/// batch again, or a change to another lab's object, as its misbehaviour has it.
pub(crate) fn act(w: &mut World, phase: &str) -> Result<(), Violation> {
    let Some((b, kind)) = w.opts.bad else {
        return Ok(());
    };
    if w.nodes[b].core.is_none() {
        return Ok(());
    }
    if kind == Misbehaviour::WritesPrefixed {
        return write_prefixed(w, b, phase);
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
        return Ok(());
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
                return Ok(());
            }
            old[w.rng.random_range(0..old.len())].1.clone()
        }
        _ => return Ok(()),
    };
    w.trace.line(&format!(
        "{} misbehave {b}->{to} {}",
        w.now,
        crate::shell::kind(&msg)
    ));
    w.net.request(&mut w.rng, w.now, b, to, msg);
    Ok(())
}

/// Node `b` takes a Sample the hub holds for another lab (under that lab's prefix), writes
/// into it under its own key and sends the hub the change. The hub must refuse it: changes to
/// a prefixed lab's objects are that lab's or the hub's.
fn write_prefixed(w: &mut World, b: usize, phase: &str) -> Result<(), Violation> {
    if !w.layout.prefixes(0, b) || w.nodes[0].core.is_none() {
        return Ok(());
    }
    let connected = w
        .net
        .link_between(b, 0)
        .is_some_and(|l| w.net.links[l].conn.is_some());
    if !connected {
        return Ok(());
    }
    let bad_id = w.node_id(b);
    let hub_id = w.node_id(0);
    let epoch = w.rng.next_u64();
    let pick = w.rng.next_u64();
    let Some(hub) = &w.nodes[0].core else {
        return Ok(());
    };
    let ty = TypeName::new("Sample").map_err(|e| fail(phase, e.to_string()))?;
    let page = hub
        .list(&ty, None, 64)
        .map_err(|e| fail(phase, e.to_string()))?;
    let mut theirs = Vec::new();
    for name in &page.ids {
        let name = ObjectId::new(name.as_str()).map_err(|e| fail(phase, e.to_string()))?;
        if let Some((doc, rec)) = hub
            .find(&ty, &name)
            .map_err(|e| fail(phase, e.to_string()))?
            && rec.origin != hub_id
            && rec.origin != bad_id
        {
            theirs.push((doc, rec));
        }
    }
    if theirs.is_empty() {
        return Ok(());
    }
    let (doc_id, rec) = theirs.swap_remove((pick % theirs.len() as u64) as usize);
    let Some(doc) = hub
        .document(&doc_id)
        .map_err(|e| fail(phase, e.to_string()))?
    else {
        return Ok(());
    };
    let actor = tidesync_proto::ids::actor_id(&bad_id, epoch);
    let key = &w.nodes[b].identity;
    let value = "overwritten by a third lab";
    let Some((header, signed)) =
        crate::workload::craft(doc, doc_id, rec, actor, key, value, phase)?
    else {
        return Ok(());
    };
    w.trace
        .line(&format!("{} misbehave {b}->0 writes into {doc_id}", w.now));
    crate::workload::inject(w, b, 0, header, signed, phase)
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
