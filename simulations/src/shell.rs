//! The shell around each simulated node's core, as the daemon's is around the real one:
//! starting a core over its store on the simulated clock, handing what its outbox holds to
//! the simulated network, delivering packets to it, and the trace of all of it. The solo
//! world starts its node and keeps its trace with the same code.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rand::RngExt;
use tidesync::core::{Clock, Core};
use tidesync::identity::Identity;
use tidesync::store::Store;
use tidesync::sync::SyncError;
use tidesync_proto::Message;

use crate::net::{Event, Packet};
use crate::options::{Violation, fail};
use crate::world::World;

/// A core over `store` with `identity`, its clock reading `clock` (simulated Unix ms).
pub(crate) fn start_core(
    name: String,
    identity: &Identity,
    store: Store,
    cache_docs: usize,
    epoch: u64,
    clock: &Arc<AtomicI64>,
) -> Core {
    let c = Arc::clone(clock);
    let clock: Clock = Arc::new(move || c.load(Ordering::SeqCst));
    Core::with_clock(
        name,
        identity.clone(),
        store,
        cache_docs,
        true,
        epoch,
        clock,
    )
}

pub(crate) fn disconnect(w: &mut World, l: usize) {
    w.net.disconnect(l);
    let (a, b) = (w.net.links[l].a, w.net.links[l].b);
    for (me, other) in [(a, b), (b, a)] {
        let id = w.node_id(other);
        if let Some(core) = w.nodes[me].core.as_mut() {
            core.on_disconnected(&id);
        }
    }
}

pub(crate) fn connect(w: &mut World, l: usize, phase: &str) -> Result<(), Violation> {
    w.net.connect(l);
    let (a, b) = (w.net.links[l].a, w.net.links[l].b);
    w.trace.line(&format!("{} connect {a}-{b}", w.now));
    for (me, other) in [(a, b), (b, a)] {
        let id = w.node_id(other);
        let out = match w.nodes[me].core.as_mut() {
            Some(core) => core.on_connected(id),
            None => Ok(()),
        };
        route(w, me, out, phase)?;
    }
    Ok(())
}

/// Bring links up and down as partitions, ships and crashes say.
pub(crate) fn refresh_links(
    w: &mut World,
    step: u32,
    jitter: bool,
    phase: &str,
) -> Result<(), Violation> {
    for l in 0..w.net.links.len() {
        let link = &w.net.links[l];
        let up = step >= link.down_until
            && w.nodes[link.a].core.is_some()
            && w.nodes[link.b].core.is_some();
        match (up, link.conn.is_some()) {
            (false, true) => disconnect(w, l),
            // Reconnects wait a random while, as the node's backoff does.
            (true, false) if !jitter || w.rng.random_bool(0.5) => connect(w, l, phase)?,
            _ => {}
        }
    }
    Ok(())
}

/// Hand what a core's outbox holds to the network, after the step that filled it. A sync
/// error from the step is handled as the node's shell handles it: logged, and that peer's
/// connection dropped; a store error is a violation (the in-memory store cannot fail).
pub(crate) fn route(
    w: &mut World,
    from: usize,
    step: Result<(), SyncError>,
    phase: &str,
) -> Result<(), Violation> {
    let out = match step {
        Ok(()) => match w.nodes[from].core.as_mut() {
            Some(core) => core.take_outbox().sends,
            None => Vec::new(),
        },
        Err(SyncError::Store { peer, source }) => {
            return Err(fail(
                phase,
                format!("node {from}: store failed syncing with {peer}: {source}"),
            ));
        }
        Err(e) => {
            w.trace.line(&format!("{} error {from}: {e}", w.now));
            return Ok(());
        }
    };
    for (peer, msg) in out {
        let Some(&to) = w.ids.get(&peer) else {
            return Err(fail(phase, format!("node {from} sent to unknown {peer}")));
        };
        remember(w, from, to, &msg);
        if !w.is_bad(from) {
            w.shaping.sent(from, to, &msg, w.now, phase)?;
        }
        if let Message::Changes { changes, upto, .. } = &msg {
            // The idle resync counts what honest nodes send (see `harness::idle_resync`).
            if !w.is_bad(from) {
                w.changes_sent += changes.len() as u64;
            }
            w.trace.line(&format!(
                "{} send {from}->{to} changes {} upto {}",
                w.now,
                changes.len(),
                upto.seq
            ));
        }
        if let Message::Ahead { changes, .. } = &msg {
            if !w.is_bad(from) {
                w.changes_sent += changes.len() as u64;
            }
            w.trace.line(&format!(
                "{} send {from}->{to} ahead {}",
                w.now,
                changes.len()
            ));
        }
        if !w.net.request(&mut w.rng, w.now, from, to, msg) {
            return Err(fail(
                phase,
                format!("node {from} sent to {to}, which it is not connected to"),
            ));
        }
    }
    Ok(())
}

/// Each node's tick, as the daemon's: links whose window opened, whose day turned or whose
/// rate allows the next batch send it.
pub(crate) fn tick(w: &mut World, phase: &str) -> Result<(), Violation> {
    for i in 0..w.nodes.len() {
        if let Some(core) = w.nodes[i].core.as_mut() {
            let out = core.pump_shaped();
            route(w, i, out, phase)?;
        }
    }
    Ok(())
}

/// Deliver every packet due by now.
pub(crate) fn deliver(w: &mut World, phase: &str) -> Result<(), Violation> {
    while let Some(event) = w.net.pop_due(w.now) {
        handle(w, event, phase)?;
    }
    Ok(())
}

pub(crate) fn handle(w: &mut World, event: Event, phase: &str) -> Result<(), Violation> {
    let (from, to) = (event.from, event.to);
    let peer = w.node_id(from);
    let Some(core) = w.nodes[to].core.as_mut() else {
        return Ok(());
    };
    match &event.packet {
        Packet::Request { msg, .. } => {
            w.trace
                .line(&format!("{} request {from}->{to} {}", w.now, kind(msg)));
            // As the daemon hands a batch over: its signatures verified ahead.
            let msg = msg.clone();
            let checked = tidesync::core::Checked::of_message(&msg, core.replica().faults());
            match core.on_request(peer, msg, checked) {
                Ok(response) => {
                    if !w.is_bad(to) {
                        w.shaping.sent(to, from, &response, w.now, phase)?;
                    }
                    w.net.respond(&mut w.rng, w.now, &event, response);
                    route(w, to, Ok(()), phase)
                }
                Err(e) => {
                    let l = event.link;
                    let r = route(w, to, Err(e), phase);
                    disconnect(w, l);
                    r
                }
            }
        }
        Packet::Response { msg, .. } => {
            w.trace
                .line(&format!("{} response {from}->{to} {}", w.now, kind(msg)));
            let out = core.on_response(peer, msg.clone());
            route(w, to, out, phase)
        }
        Packet::Failed { .. } => {
            w.trace.line(&format!("{} failed {to}->{from}", w.now));
            let out = core.on_request_failed(peer);
            route(w, to, out, phase)
        }
    }
}

/// A message's kind and size, for the trace.
pub(crate) fn kind(msg: &Message) -> String {
    match msg {
        Message::Hello { resume, tip, .. } => format!("hello resume {} tip {tip}", resume.seq),
        Message::Changes {
            after,
            changes,
            upto,
            ..
        } => format!("changes {after}..{} n {}", upto.seq, changes.len()),
        Message::Rewound { resume } => format!("rewound {}", resume.seq),
        Message::Ack {
            batch,
            upto,
            rejected,
        } => format!("ack {batch} upto {upto} rejected {rejected}"),
        Message::Status { status } => format!("status {} bytes", status.record.len()),
        Message::Ahead { changes, .. } => format!("ahead n {}", changes.len()),
    }
}

/// Most `Changes` requests the misbehaving node keeps to replay.
pub const MAX_REPLAYS_KEPT: usize = 64;

/// Keep a `Changes` request the misbehaving node sent, to replay it later.
pub(crate) fn remember(w: &mut World, from: usize, to: usize, msg: &Message) {
    if w.opts
        .bad
        .is_some_and(|(b, k)| b == from && k == crate::options::Misbehaviour::Replay)
        && matches!(msg, Message::Changes { .. })
    {
        if w.replays.len() >= MAX_REPLAYS_KEPT {
            let i = w.rng.random_range(0..w.replays.len());
            w.replays.swap_remove(i);
        }
        w.replays.push((to, msg.clone()));
    }
}
