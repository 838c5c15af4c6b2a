//! tidesync: a peer-to-peer, multi-master sync node for typed objects kept as signed Automerge
//! documents in redb.
//!
//! # Layout
//! The layers run down this list; each module calls only those below it (ARCHITECTURE.md
//! draws them). A type's inherent `impl` blocks live in its module or that module's own
//! submodules.
//!
//! **The process, the API and the CLI**
//! - [`cli`]: the `tidesync` command line.
//! - [`client`]: the CLI's way to a node: its HTTP API when it runs, its store when it does not.
//! - [`demo`]: `tidesync demo`, a hub and two labs converging on 127.0.0.1.
//! - [`fuzzing`]: the fuzz targets' harnesses (`fuzz/`), replayed on stable by the tests.
//! - [`daemon`]: the node process: starts, supervises and stops the actors and the API.
//! - [`api`]: the HTTP/JSON API served by a running node.
//! - [`report`]: the kinds of failure, each with one HTTP status and one exit code.
//! - [`node`]: the node actor: owns the core, drains its outbox to the network actor.
//! - [`netloop`]: the network actor: polls the swarm and dials peers, never waiting for the core.
//! - [`net`]: the libp2p shell: transport, gating, the request-response codec, backoff.
//! - [`netfiles`]: the files protocol's libp2p name, stream caps and frame codec.
//! - [`metrics`]: the Prometheus registry of `GET /metrics`: histograms, status series, libp2p's.
//! - [`held`]: `tidesync held`: listing and purging held changes, with each sender's quota.
//!
//! **Core, sync and replica**
//! - [`core`]: the façade every caller drives: replica, sessions, and the outbox to drain.
//! - [`bundle`]: signed, encrypted export bundles for one peer, streamed with their files: the
//!   format, export and import.
//! - [`sync`]: the session state machine (Hello, Changes, Ack, Rewound) over the replica.
//! - [`replica`]: the only writer of document state: local writes, receiving a batch in three
//!   stages, reading the log for a peer, views and references; its [`replica::engine`] turns
//!   writes and arrivals into signed changes and records without I/O.
//! - [`reads`]: reads of the last commit (objects, history, feed, status), off the actor.
//!
//! **Store, model and the leaves**
//! - [`store`]: the redb tables (the disk format) and plain reads and writes; decides nothing.
//! - [`config`]: the node's home directory and its TOML config file, loaded once.
//! - [`policy`]: per-peer policies: what may be sent to and taken from each peer.
//! - [`identity`]: the ed25519 key file and the ids derived from it.
//! - [`model`]: the records every layer shares (documents, log entries, peer records, batches),
//!   the checkpoint rule and the glossary of log positions.
//! - [`doc`]: how an object's JSON maps onto an Automerge document; the deletion tombstone rule.
//! - [`concurrent`]: fields with concurrent values: finding them, and the write that resolves one.
//! - [`link`]: what a link may carry to a peer: sync windows, a daily budget, a rate (pure).
//! - [`files`]: a file's content address (BLAKE3), the reference a field holds, the limits.
//! - [`fault`]: every deliberate fault, behind the `fault-injection` feature.
//! - [`ratelog`]: per-peer rate limits for log lines a peer can provoke (refused changes).
//! - [`when`]: Unix times as RFC 3339, safe for any value a peer sends.
//! - [`atomic`]: writing a file whole or not at all (temp file, sync, rename).

pub mod api;
pub mod atomic;
pub mod bundle;
pub mod cli;
pub mod client;
pub mod concurrent;
pub mod config;
pub mod core;
pub mod daemon;
pub mod demo;
pub mod doc;
pub mod fault;
pub mod files;
pub mod fuzzing;
pub mod held;
pub mod identity;
pub mod link;
pub mod metrics;
pub mod model;
pub mod net;
pub mod netfiles;
pub mod netloop;
pub mod node;
pub mod policy;
pub mod ratelog;
pub mod reads;
pub mod replica;
pub mod report;
pub mod store;
pub mod sync;
pub mod when;
