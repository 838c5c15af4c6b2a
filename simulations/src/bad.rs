//! The misbehaving node a world may have: switching its misbehaviour on in its core, and the
//! bogus messages it sends. The invariants check the honest nodes only.

use rand::{Rng, RngExt};
use tidesync::core::Core;
use tidesync::fault::{EngineFault, Fault};
use tidesync_proto::{Checkpoint, Message, ObjectId, TypeName};

use crate::options::{Misbehaviour, Violation, fail};
use crate::world::World;

/// Switch on what the core of a node that does `m` itself does wrong (the bogus messages
/// come from [`act`]).
pub(crate) fn switch_on(m: Misbehaviour, core: &mut Core) {
    match m {
        Misbehaviour::IgnorePolicy => core.inject_process_fault(Fault::IgnorePolicy),
        Misbehaviour::SendSkipped => core.inject_fault(EngineFault::IgnoreSkip),
        Misbehaviour::Equivocate => core.inject_process_fault(Fault::Equivocate),
        Misbehaviour::BogusHellos | Misbehaviour::Replay | Misbehaviour::WritesPrefixed => {}
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
