//! What a world runs and what it reports: the options (each derived from the seed unless
//! given), the report of a finished world, and the violation that names a failed invariant.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tidesync::fault::EngineFault;

use crate::net::NetFaults;
use crate::topology::Topology;

/// What a world runs. Every option not given on the command line is derived from the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub seed: u64,
    pub topology: Topology,
    pub nodes: usize,
    pub steps: u32,
    /// Chance of a crash at each step, in thousandths.
    pub crash_per_mille: u32,
    pub net: NetFaults,
    /// A deliberate engine bug switched on in every node (see `tidesync::fault`).
    pub fault: Option<EngineFault>,
    /// The misbehaving node, if the world has one, and how it misbehaves (never node 0).
    pub bad: Option<(usize, Misbehaviour)>,
    /// Whether links carry budgets, windows and rates (see the `shaping` module).
    pub shaped: bool,
    /// Whether writes attach files, which then move between the nodes (see `files.rs`).
    pub files: bool,
}

/// Options given on the command line; the rest come from the seed.
#[derive(Debug, Clone, Default)]
pub struct Given {
    pub topology: Option<Topology>,
    pub nodes: Option<usize>,
    pub steps: Option<u32>,
    pub crash_per_mille: Option<u32>,
    pub drop_per_mille: Option<u32>,
    pub dup_per_mille: Option<u32>,
    pub max_delay_ms: Option<i64>,
    pub fault: Option<EngineFault>,
    /// `Some(None)`: no misbehaving node; `Some(Some(m))`: one that does `m`.
    pub bad: Option<Option<Misbehaviour>>,
    pub bad_node: Option<usize>,
    pub shaped: Option<bool>,
    pub files: Option<bool>,
}

impl Options {
    /// The world of `seed`, with what `given` fixes and the rest drawn from the seed.
    pub fn derive(seed: u64, given: &Given) -> Options {
        // A separate stream from the world's own, so that fixing one option by hand does not
        // change the others.
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0005_eed0_f0b7_1075);
        let topology = Topology::ALL[rng.random_range(0..Topology::ALL.len())];
        let topology = given.topology.unwrap_or(topology);
        let nodes = rng.random_range(topology.min_nodes()..=6);
        let steps = rng.random_range(200..=500);
        let crash = rng.random_range(0..=15);
        let drop = rng.random_range(0..=60);
        let dup = rng.random_range(0..=40);
        let delay = rng.random_range(1..=60);
        let nodes = given.nodes.unwrap_or(nodes).max(topology.min_nodes());
        // Half the worlds have a misbehaving node (drawn last, so the draws above stay).
        let kind = Misbehaviour::ALL[rng.random_range(0..Misbehaviour::ALL.len())];
        let kind = rng.random_bool(0.5).then_some(kind);
        let node = rng.random_range(1..nodes);
        let bad = given
            .bad
            .unwrap_or(kind)
            .map(|k| (given.bad_node.unwrap_or(node).clamp(1, nodes - 1), k));
        // Half the worlds have shaped links (drawn after the rest, which stay as they were).
        let shaped = given.shaped.unwrap_or(rng.random_bool(0.5));
        // Half the worlds have files (drawn last again).
        let files = given.files.unwrap_or(rng.random_bool(0.5));
        Options {
            seed,
            topology,
            nodes,
            steps: given.steps.unwrap_or(steps),
            crash_per_mille: given.crash_per_mille.unwrap_or(crash),
            net: NetFaults {
                max_delay_ms: given.max_delay_ms.unwrap_or(delay),
                drop_per_mille: given.drop_per_mille.unwrap_or(drop),
                dup_per_mille: given.dup_per_mille.unwrap_or(dup),
            },
            fault: given.fault,
            bad,
            shaped,
            files,
        }
    }

    /// The command that replays this world exactly.
    pub fn command(&self) -> String {
        let mut c = format!(
            "cargo run --release -p tidesync-sim -- --seed {} --topology {} --nodes {} --steps {} --crash-per-mille {} --drop-per-mille {} --dup-per-mille {} --max-delay-ms {}",
            self.seed,
            self.topology,
            self.nodes,
            self.steps,
            self.crash_per_mille,
            self.net.drop_per_mille,
            self.net.dup_per_mille,
            self.net.max_delay_ms
        );
        if let Some(f) = self.fault {
            c.push_str(&format!(" --fault {f}"));
        }
        match self.bad {
            Some((n, m)) => c.push_str(&format!(" --bad {m} --bad-node {n}")),
            None => c.push_str(" --bad none"),
        }
        c.push_str(&format!(" --shaped {} --files {}", self.shaped, self.files));
        c
    }
}

impl std::fmt::Display for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} topology {} nodes {} steps {} crash-per-mille {} drop-per-mille {} dup-per-mille {} max-delay-ms {} fault {} bad {} shaped {} files {}",
            self.seed,
            self.topology,
            self.nodes,
            self.steps,
            self.crash_per_mille,
            self.net.drop_per_mille,
            self.net.dup_per_mille,
            self.net.max_delay_ms,
            self.fault.map(|f| f.name()).unwrap_or("none"),
            self.bad
                .map(|(n, m)| format!("{m}@{n}"))
                .unwrap_or_else(|| "none".into()),
            self.shaped,
            self.files
        )
    }
}

/// What a finished world did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// FNV-1a 64 over every line of the trace: equal traces give equal hashes.
    pub trace_hash: u64,
    pub writes_acked: u64,
    pub writes_refused: u64,
    pub forgeries: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub policy_changes: u64,
    pub messages: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// Rounds from the heal until nothing was in flight.
    pub heal_rounds: u32,
    /// Equivocations found, summed over the honest nodes.
    pub equivocations: u64,
    /// Documents held across all nodes at the end.
    pub docs: usize,
    /// Files attached by writes, and files stored across all nodes at the end.
    pub files_added: u64,
    pub files_stored: u64,
}

/// An invariant that failed, and where.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{phase}: {what}")]
pub struct Violation {
    /// `step N`, `heal` or `check`.
    pub phase: String,
    pub what: String,
}

pub(crate) fn fail(phase: impl Into<String>, what: impl Into<String>) -> Violation {
    Violation {
        phase: phase.into(),
        what: what.into(),
    }
}

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
