//! Deterministic simulations of tidesync nodes: every run is driven by one seed and runs the
//! node's real core, engine and redb store (in memory) under a simulated clock.
//!
//! # Layout
//! - [`world`]: one seeded world, its workload, its crashes and the invariants checked.
//!
//! Today a world holds one node; multi-node topologies and a simulated network arrive with the
//! sync engine.

pub mod world;
