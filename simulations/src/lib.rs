//! Deterministic simulations of tidesync: many nodes in one process, each running the daemon's
//! own core, sync sessions, policies and redb store (in memory), wired through a simulated
//! network on a simulated clock, all driven by one seed.
//!
//! # Layout
//! - [`topology`]: shapes of worlds (star, mesh, line, two hubs, ships), each node's policies,
//!   and the same rules restated as what the invariants expect.
//! - [`net`]: the simulated network: links, connections, and packets that are delayed,
//!   reordered, duplicated and dropped.
//! - [`options`]: what a world runs (derived from its seed) and what it reports.
//! - [`harness`]: one seeded world of many nodes, after TigerBeetle's VOPR: its steps, the
//!   heal and the run; [`run`] is the way in.
//! - [`world`]: a world's state: nodes, network, clock, RNG, trace and report.
//! - [`shell`]: each node's shell: starting its core, routing its outbox through the
//!   simulated network, delivering packets, and the trace.
//! - [`workload`]: writes, deletes, forgeries, partitions, voyages and policy changes.
//! - [`bad`]: the misbehaving node a world may have, and what it does wrong.
//! - [`invariants`]: what must hold after the heal, at every honest node.
//! - [`shaping`]: metered and windowed links, the clock's jumps, and the link invariants
//!   checked as each message leaves.
//! - [`files`]: files attached by writes, moved segment by segment through the nodes' real
//!   stores over the simulated links, and the file invariants.
//! - [`solo`]: one node alone under crashes, checked after every step against a model of its
//!   acknowledged writes.

pub mod bad;
pub mod files;
pub mod harness;
pub mod invariants;
pub mod net;
pub mod options;
pub mod shaping;
pub mod shell;
pub mod solo;
pub mod topology;
pub mod workload;
pub mod world;

pub use harness::{MAX_HEAL_ROUNDS, run};
pub use options::{Given, Options, Report, Violation};
