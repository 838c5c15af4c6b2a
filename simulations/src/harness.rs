//! The harness of one seeded world of many nodes, after TigerBeetle's VOPR: each node runs
//! the daemon's real core, sync sessions and policies over its own in-memory redb store,
//! wired through the simulated network ([`crate::shell`], [`crate::net`]), under the random
//! workload ([`crate::workload`]); then a heal phase and the invariants
//! ([`crate::invariants`]). One seed replays one world exactly.

use std::sync::atomic::Ordering;

use rand::{Rng, RngExt};

use crate::net::NetFaults;
use crate::options::{Options, Report, Violation, fail};
use crate::shell;
use crate::topology::Topology;
use crate::world::World;
use crate::{invariants, workload};

/// Documents each simulated node keeps decoded: small, so that eviction is exercised.
const SIM_CACHE_DOCS: usize = 8;
/// Simulated milliseconds between steps.
const STEP_MS: i64 = 10;
/// Simulated milliseconds per heal round: longer than a request's timeout, so that every
/// packet sent in one round is delivered (or failed) in the next.
const HEAL_ROUND_MS: i64 = crate::net::REQUEST_TIMEOUT_MS + 50;
/// Rounds the heal may take before the world counts as not converging.
pub const MAX_HEAL_ROUNDS: u32 = 200;

/// Run one world; `Err` names the first invariant that failed.
pub fn run(opts: &Options) -> Result<Report, Violation> {
    let mut world = World::new(opts)?;
    for i in 0..world.nodes.len() {
        start_node(&mut world, i, "start")?;
    }
    for step in 0..opts.steps {
        run_step(&mut world, step)?;
    }
    invariants::check_meters(&world, "before the heal")?;
    heal(&mut world)?;
    invariants::check(&mut world)?;
    idle_resync(&mut world)?;
    world.report.trace_hash = world.trace.0;
    Ok(world.report)
}

/// Start (or restart) node `i` over its store, with a fresh epoch and its policies.
pub(crate) fn start_node(w: &mut World, i: usize, phase: &str) -> Result<(), Violation> {
    let store = w.nodes[i]
        .store
        .take()
        .ok_or_else(|| fail(phase, format!("node {i} has no store to start from")))?;
    let mut core = shell::start_core(
        w.layout.name(i),
        &w.nodes[i].identity,
        store,
        SIM_CACHE_DOCS,
        w.rng.next_u64(),
        &w.clock,
    );
    for peer in w.neighbours(i) {
        let policy = w.policy(i, peer);
        core.set_policy(w.node_id(peer), w.layout.name(peer), policy)
            .map_err(|e| fail(phase, format!("node {i}: setting a policy: {e}")))?;
    }
    // As the daemon does at start: downloads carry on where they were.
    core.load_wants()
        .map_err(|e| fail(phase, format!("node {i}: loading the want-list: {e}")))?;
    if let Some(f) = w.opts.fault {
        core.inject_fault(f);
    }
    if let Some((b, m)) = w.opts.bad
        && b == i
    {
        crate::bad::switch_on(m, &mut core);
    }
    w.nodes[i].core = Some(core);
    invariants::check_acked(w, i, phase)
}

pub(crate) fn crash_node(w: &mut World, i: usize, until: u32) {
    for l in 0..w.net.links.len() {
        let link = &w.net.links[l];
        if (link.a == i || link.b == i) && link.conn.is_some() {
            shell::disconnect(w, l);
        }
    }
    if let Some(core) = w.nodes[i].core.take() {
        w.nodes[i].store = Some(core.into_store());
    }
    w.nodes[i].down_until = until;
    w.report.crashes += 1;
}

pub(crate) fn run_step(w: &mut World, step: u32) -> Result<(), Violation> {
    let phase = format!("step {step}");
    w.now += STEP_MS;
    if let Some(minutes) = w.shaping.jump() {
        // Time passes with nothing happening: windows open and close, days turn.
        w.now += minutes * 60_000;
        w.trace.line(&format!("{} jump {minutes} min", w.now));
    }
    w.clock.store(w.now, Ordering::SeqCst);
    shell::deliver(w, &phase)?;
    shell::tick(w, &phase)?;
    if w.opts.files {
        crate::files::exchange(w, &phase)?;
    }
    for i in 0..w.nodes.len() {
        if w.nodes[i].core.is_none() && step >= w.nodes[i].down_until {
            w.trace.line(&format!("{} restart {i}", w.now));
            start_node(w, i, &phase)?;
        }
    }
    if w.opts.topology == Topology::Ships {
        workload::ships_sail(w, step);
    }
    let roll = w.rng.random_range(0..1000u32);
    let crash = w.opts.crash_per_mille;
    if roll < crash {
        let i = w.rng.random_range(0..w.nodes.len());
        if w.nodes[i].core.is_some() {
            let until = step + w.rng.random_range(1..=30);
            w.trace.line(&format!("{} crash {i} until {until}", w.now));
            crash_node(w, i, until);
        }
    } else if roll < crash + 15 {
        workload::partition(w, step);
    } else if roll < crash + 30 {
        let l = w.rng.random_range(0..w.net.links.len());
        let until = step + w.rng.random_range(1..=20);
        w.net.links[l].down_until = until;
        w.trace.line(&format!("{} flap {l} until {until}", w.now));
    } else if roll < crash + 40 {
        workload::change_policy(w, &phase)?;
    } else if roll < crash + 50 {
        workload::forge(w, &phase)?;
    } else if roll < crash + 60 {
        crate::bad::act(w, &phase)?;
    } else {
        workload::write(w, &phase)?;
    }
    shell::refresh_links(w, step, true, &phase)
}

/// All links up, every node running, a perfect network and the final policies; then
/// rounds until nothing is in flight.
pub(crate) fn heal(w: &mut World) -> Result<(), Violation> {
    let phase = "heal";
    w.net.faults = NetFaults::NONE;
    for i in 0..w.nodes.len() {
        if w.nodes[i].core.is_none() {
            start_node(w, i, phase)?;
        }
    }
    for link in &mut w.net.links {
        link.down_until = 0;
    }
    for (me, peer) in std::mem::take(&mut w.narrowed) {
        workload::apply_policy(w, me, peer, phase)?;
    }
    // Links lose their shaping, so that what waited for a window or a budget goes now.
    for (me, peer) in std::mem::take(&mut w.shaping.links).into_keys() {
        workload::apply_policy(w, me, peer, phase)?;
        let out = match w.nodes[me].core.as_mut() {
            Some(core) => core.pump_all(),
            None => Ok(()),
        };
        shell::route(w, me, out, phase)?;
    }
    w.report.heal_rounds = settle(w, phase)?;
    if w.opts.files {
        crate::files::settle(w, phase)?;
    }
    Ok(())
}

/// Connect every link and run rounds until nothing is in flight; how many it took.
pub(crate) fn settle(w: &mut World, phase: &str) -> Result<u32, Violation> {
    let mut rounds = 0;
    loop {
        shell::refresh_links(w, u32::MAX, false, phase)?;
        if w.net.in_flight() == 0 {
            return Ok(rounds);
        }
        rounds += 1;
        if rounds > MAX_HEAL_ROUNDS {
            return Err(fail(
                phase,
                format!(
                    "still {} packets in flight after {MAX_HEAL_ROUNDS} rounds",
                    w.net.in_flight()
                ),
            ));
        }
        w.now += HEAL_ROUND_MS;
        w.clock.store(w.now, Ordering::SeqCst);
        shell::deliver(w, phase)?;
    }
}

/// After the check: drop every connection and reconnect. Nodes in sync exchange no
/// changes (checkpoints were stored with what they cover).
pub(crate) fn idle_resync(w: &mut World) -> Result<(), Violation> {
    let phase = "idle resync";
    for l in 0..w.net.links.len() {
        shell::disconnect(w, l);
    }
    let before = w.changes_sent;
    settle(w, phase)?;
    let moved = w.changes_sent - before;
    if moved > 0 {
        return Err(fail(
            phase,
            format!("{moved} changes crossed between nodes that were already in sync"),
        ));
    }
    w.report.messages = w.net.sent;
    w.report.dropped = w.net.dropped;
    w.report.duplicated = w.net.duplicated;
    Ok(())
}
