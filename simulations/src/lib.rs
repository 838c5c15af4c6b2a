//! Deterministic simulations of tidesync: many nodes in one process, each running the daemon's
//! own core, sync sessions, policies and redb store (in memory), wired through a simulated
//! network on a simulated clock, all driven by one seed.
//!
//! # Layout
//! - [`topology`]: shapes of worlds (star, mesh, line, two hubs, ships), each node's policies,
//!   and the same rules restated as what the invariants expect.
//! - [`net`]: the simulated network: links, connections, and packets that are delayed,
//!   reordered, duplicated and dropped.
//! - [`world`]: one seeded world of many nodes: workload, forgeries, crashes, partitions,
//!   policy changes, the heal and the invariants.
//! - [`solo`]: one node alone under crashes, checked after every step against a model of its
//!   acknowledged writes.

pub mod net;
pub mod solo;
pub mod topology;
pub mod world;
