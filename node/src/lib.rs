//! tidesync: a peer-to-peer, multi-master sync node for typed objects kept as signed Automerge
//! documents in redb.
//!
//! # Layout
//! - [`model`]: the records every layer shares (documents, log entries, peer records, batches)
//!   and the glossary of log positions.
//! - [`atomic`]: writing a file whole or not at all (temp file, sync, rename).
//! - [`config`]: the node's home directory and its TOML config file.
//! - [`identity`]: the ed25519 key file and the ids derived from it.
//! - [`doc`]: how an object's JSON maps onto an Automerge document; the deletion tombstone rule.
//! - [`engine`]: the sans-IO engine that turns inputs into signed changes and durable records.
//! - [`store`]: the redb tables and the transactions that commit the engine's records.
//! - [`reads`]: reads of the last commit (objects, history, feed, status), off the actor.
//! - [`core`]: engine, store and document cache behind the node's operations.
//! - [`fault`]: deliberate engine faults that simulations switch on to prove their invariants.
//! - [`held`]: `tidesync held`: listing and purging held changes, with each sender's quota.
//! - [`bundle`]: signed, encrypted export bundles of changes for one peer, and their import.
//! - [`sync`]: per-peer sync sessions: streaming the change log, storing what peers send.
//! - [`outbound`]: what goes into one batch for a peer, within the frame budget.
//! - [`carry`]: views and referenced objects a batch brings along.
//! - [`net`]: the libp2p shell: transport, gating, the request-response codec, backoff.
//! - [`netloop`]: the network actor: polls the swarm and dials peers, never waiting for the core.
//! - [`demo`]: `tidesync demo`, a hub and two labs converging on 127.0.0.1.
//! - [`node`]: the node actor owning the core, its handle, and reads off it.
//! - [`daemon`]: the node process: starts, supervises and stops the actors and the API.
//! - [`policy`]: per-peer policies: what may be sent to and taken from each peer.
//! - [`ratelog`]: per-peer rate limits for log lines a peer can provoke (refused changes).
//! - [`api`]: the HTTP/JSON API served by a running node.
//! - [`report`]: the kinds of failure, each with one HTTP status and one exit code.
//! - [`client`]: the CLI's way to a node: its HTTP API when it runs, its store when it does not.
//! - [`cli`]: the `tidesync` command line.
//! - [`fuzzing`]: the fuzz targets' harnesses (`fuzz/`), replayed on stable by the tests.

pub mod api;
pub mod atomic;
pub mod bundle;
pub mod cli;
pub mod client;
pub mod config;
pub mod core;
pub mod daemon;
pub mod demo;
pub mod doc;
pub mod fault;
pub mod fuzzing;
pub mod held;
pub mod identity;
pub mod model;
pub mod net;
pub mod netloop;
pub mod node;
pub mod policy;
pub mod ratelog;
pub mod reads;
pub mod replica;
pub mod report;
pub mod store;
pub mod sync;
