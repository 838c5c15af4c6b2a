//! The harness of one seeded world of many nodes, after TigerBeetle's VOPR: each node runs
//! the daemon's real core, sync sessions and policies over its own in-memory redb store,
//! wired through the simulated network ([`crate::shell`], [`crate::net`]), under the random
//! workload ([`crate::workload`]); then a heal phase and the invariants
//! ([`crate::invariants`]). One seed replays one world exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use tidesync::core::Core;
use tidesync::identity::Identity;
use tidesync::store::Store;
use tidesync_proto::NodeId;

use crate::net::{Net, NetFaults};
use crate::options::{Options, Report, Violation, fail};
use crate::shell::{self, Trace};
use crate::topology::{Layout, Topology};
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
/// The simulated clock's start, Unix milliseconds.
const EPOCH_MS: i64 = 1_700_000_000_000;

/// One simulated node.
pub(crate) struct SimNode {
    pub(crate) identity: Identity,
    /// The running core, or `None` while crashed.
    pub(crate) core: Option<Core>,
    /// The store of a crashed node: only what it committed.
    pub(crate) store: Option<Store>,
    /// Back up at this step, while crashed.
    pub(crate) down_until: u32,
    /// Every write acknowledged to the local writer: (document, change hash).
    pub(crate) acked: Vec<(String, String)>,
}

pub(crate) struct World {
    pub(crate) opts: Options,
    pub(crate) layout: Layout,
    pub(crate) rng: StdRng,
    pub(crate) clock: Arc<AtomicI64>,
    pub(crate) now: i64,
    pub(crate) nodes: Vec<SimNode>,
    pub(crate) ids: BTreeMap<NodeId, usize>,
    pub(crate) net: Net,
    /// (me, peer) sides whose policy skips `Volume` now.
    pub(crate) narrowed: BTreeSet<(usize, usize)>,
    pub(crate) trace: Trace,
    pub(crate) report: Report,
    /// Changes carried by `Changes` requests so far.
    pub(crate) changes_sent: u64,
}

/// Run one world; `Err` names the first invariant that failed.
pub fn run(opts: &Options) -> Result<Report, Violation> {
    let mut world = World::new(opts)?;
    for step in 0..opts.steps {
        world.step(step)?;
    }
    world.heal()?;
    invariants::check(&mut world)?;
    invariants::idle_resync(&mut world)?;
    world.report.trace_hash = world.trace.0;
    Ok(world.report)
}

impl World {
    fn new(opts: &Options) -> Result<World, Violation> {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let layout = Layout::new(opts.topology, opts.nodes);
        let clock = Arc::new(AtomicI64::new(EPOCH_MS));
        let mut nodes = Vec::new();
        let mut ids = BTreeMap::new();
        for i in 0..layout.len() {
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            let identity = Identity::from_secret(secret);
            ids.insert(identity.node_id(), i);
            let store = Store::in_memory().map_err(|e| fail("start", e.to_string()))?;
            nodes.push(SimNode {
                identity,
                core: None,
                store: Some(store),
                down_until: 0,
                acked: Vec::new(),
            });
        }
        let net = Net::new(&layout.links, opts.net);
        let mut world = World {
            opts: opts.clone(),
            layout,
            rng,
            clock,
            now: EPOCH_MS,
            nodes,
            ids,
            net,
            narrowed: BTreeSet::new(),
            trace: Trace::new(),
            report: Report {
                trace_hash: 0,
                writes_acked: 0,
                writes_refused: 0,
                forgeries: 0,
                crashes: 0,
                partitions: 0,
                policy_changes: 0,
                messages: 0,
                dropped: 0,
                duplicated: 0,
                heal_rounds: 0,
                docs: 0,
            },
            changes_sent: 0,
        };
        for i in 0..world.nodes.len() {
            world.start(i, "start")?;
        }
        Ok(world)
    }

    pub(crate) fn node_id(&self, i: usize) -> NodeId {
        self.nodes[i].identity.node_id()
    }

    /// The peers of node `i`, by link.
    pub(crate) fn neighbours(&self, i: usize) -> Vec<usize> {
        self.net
            .links
            .iter()
            .filter(|l| l.a == i || l.b == i)
            .map(|l| l.other(i))
            .collect()
    }

    /// Start (or restart) node `i` over its store, with a fresh epoch and its policies.
    pub(crate) fn start(&mut self, i: usize, phase: &str) -> Result<(), Violation> {
        let store = self.nodes[i]
            .store
            .take()
            .ok_or_else(|| fail(phase, format!("node {i} has no store to start from")))?;
        let mut core = shell::start_core(
            self.layout.name(i),
            &self.nodes[i].identity,
            store,
            SIM_CACHE_DOCS,
            self.rng.next_u64(),
            &self.clock,
        );
        for peer in self.neighbours(i) {
            let policy = self.layout.policy(i, peer, &self.narrowed);
            core.set_policy(self.node_id(peer), self.layout.name(peer), policy)
                .map_err(|e| fail(phase, format!("node {i}: setting a policy: {e}")))?;
        }
        if let Some(f) = self.opts.fault {
            core.inject_fault(f);
        }
        self.nodes[i].core = Some(core);
        invariants::check_acked(self, i, phase)
    }

    pub(crate) fn crash(&mut self, i: usize, until: u32) {
        for l in 0..self.net.links.len() {
            let link = &self.net.links[l];
            if (link.a == i || link.b == i) && link.conn.is_some() {
                shell::disconnect(self, l);
            }
        }
        if let Some(core) = self.nodes[i].core.take() {
            self.nodes[i].store = Some(core.into_store());
        }
        self.nodes[i].down_until = until;
        self.report.crashes += 1;
    }

    fn step(&mut self, step: u32) -> Result<(), Violation> {
        let phase = format!("step {step}");
        self.now += STEP_MS;
        self.clock.store(self.now, Ordering::SeqCst);
        shell::deliver(self, &phase)?;
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() && step >= self.nodes[i].down_until {
                self.trace.line(&format!("{} restart {i}", self.now));
                self.start(i, &phase)?;
            }
        }
        if self.opts.topology == Topology::Ships {
            workload::ships_sail(self, step);
        }
        let roll = self.rng.random_range(0..1000u32);
        let crash = self.opts.crash_per_mille;
        if roll < crash {
            let i = self.rng.random_range(0..self.nodes.len());
            if self.nodes[i].core.is_some() {
                let until = step + self.rng.random_range(1..=30);
                self.trace
                    .line(&format!("{} crash {i} until {until}", self.now));
                self.crash(i, until);
            }
        } else if roll < crash + 15 {
            workload::partition(self, step);
        } else if roll < crash + 30 {
            let l = self.rng.random_range(0..self.net.links.len());
            let until = step + self.rng.random_range(1..=20);
            self.net.links[l].down_until = until;
            self.trace
                .line(&format!("{} flap {l} until {until}", self.now));
        } else if roll < crash + 40 {
            workload::change_policy(self, &phase)?;
        } else if roll < crash + 60 {
            workload::forge(self, &phase)?;
        } else {
            workload::write(self, &phase)?;
        }
        shell::refresh_links(self, step, true, &phase)
    }

    /// All links up, every node running, a perfect network and the final policies; then
    /// rounds until nothing is in flight.
    fn heal(&mut self) -> Result<(), Violation> {
        let phase = "heal";
        self.net.faults = NetFaults::NONE;
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() {
                self.start(i, phase)?;
            }
        }
        for link in &mut self.net.links {
            link.down_until = 0;
        }
        for (me, peer) in std::mem::take(&mut self.narrowed) {
            workload::apply_policy(self, me, peer, phase)?;
        }
        self.report.heal_rounds = self.settle(phase)?;
        Ok(())
    }

    /// Connect every link and run rounds until nothing is in flight; how many it took.
    pub(crate) fn settle(&mut self, phase: &str) -> Result<u32, Violation> {
        let mut rounds = 0;
        loop {
            shell::refresh_links(self, u32::MAX, false, phase)?;
            if self.net.in_flight() == 0 {
                return Ok(rounds);
            }
            rounds += 1;
            if rounds > MAX_HEAL_ROUNDS {
                return Err(fail(
                    phase,
                    format!(
                        "still {} packets in flight after {MAX_HEAL_ROUNDS} rounds",
                        self.net.in_flight()
                    ),
                ));
            }
            self.now += HEAL_ROUND_MS;
            self.clock.store(self.now, Ordering::SeqCst);
            shell::deliver(self, phase)?;
        }
    }
}
