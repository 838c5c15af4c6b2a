//! The state of one simulated world: its nodes (each a core while up, its store while
//! crashed), the simulated network and clock, the seeded RNG, the trace and the report.
//! What changes it lives in the harness, the shell and the workload (`harness.rs`,
//! `shell.rs`, `workload.rs`), which build on this module.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidesync::core::Core;
use tidesync::identity::Identity;
use tidesync::store::Store;
use tidesync_proto::NodeId;

use crate::net::Net;
use crate::options::{Options, Report, Violation, fail};
use crate::shaping::Shaping;
use crate::topology::Layout;

/// The simulated clock's start, Unix milliseconds.
pub(crate) const EPOCH_MS: i64 = 1_700_000_000_000;

/// FNV-1a 64 over lines.
pub(crate) struct Trace(pub(crate) u64);

impl Trace {
    pub(crate) fn line(&mut self, line: &str) {
        if std::env::var_os("TIDESYNC_SIM_TRACE").is_some() {
            eprintln!("{line}");
        }
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl Trace {
    /// A trace with nothing in it yet.
    pub(crate) fn new() -> Trace {
        Trace(0xcbf2_9ce4_8422_2325)
    }
}

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
    /// `Changes` requests the misbehaving node sent, with their receiver, to replay.
    pub(crate) replays: Vec<(usize, tidesync_proto::Message)>,
    /// The world's shaped links and what crossed them.
    pub(crate) shaping: Shaping,
    /// Where the nodes keep their files, in a world with files (removed with the world).
    pub(crate) _files_dir: Option<tempfile::TempDir>,
    /// What the workload attached to objects (see `files.rs`).
    pub(crate) files: Attached,
}

/// The files the workload attached (see `files.rs`).
#[derive(Debug, Default)]
pub(crate) struct Attached {
    /// By node: the files it stored itself.
    pub(crate) local: BTreeMap<usize, BTreeSet<tidesync::files::FileHash>>,
    /// Files attached to a `Template` outside its published field: an archive, sent views
    /// of that field alone, never holds them.
    pub(crate) hidden: BTreeSet<tidesync::files::FileHash>,
}

impl World {
    pub(crate) fn new(opts: &Options) -> Result<World, Violation> {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let layout = Layout::new(opts.topology, opts.nodes);
        let clock = Arc::new(AtomicI64::new(EPOCH_MS));
        let mut nodes = Vec::new();
        let mut ids = BTreeMap::new();
        let files_dir = match opts.files {
            true => Some(tempfile::tempdir().map_err(|e| fail("start", e.to_string()))?),
            false => None,
        };
        for i in 0..layout.len() {
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            let identity = Identity::from_secret(secret);
            ids.insert(identity.node_id(), i);
            let store = match &files_dir {
                Some(dir) => Store::in_memory_beside(&dir.path().join(format!("node-{i}"))),
                None => Store::in_memory(),
            }
            .map_err(|e| fail("start", e.to_string()))?;
            nodes.push(SimNode {
                identity,
                core: None,
                store: Some(store),
                down_until: 0,
                acked: Vec::new(),
            });
        }
        let net = Net::new(&layout.links, opts.net);
        let shaping = Shaping::draw(opts.seed, opts.shaped, &layout.links);
        let world = World {
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
                equivocations: 0,
                files_added: 0,
                files_stored: 0,
            },
            changes_sent: 0,
            replays: Vec::new(),
            shaping,
            _files_dir: files_dir,
            files: Default::default(),
        };
        Ok(world)
    }

    /// Whether node `i` is the world's misbehaving node.
    pub(crate) fn is_bad(&self, i: usize) -> bool {
        self.opts.bad.is_some_and(|(b, _)| b == i)
    }

    pub(crate) fn node_id(&self, i: usize) -> NodeId {
        self.nodes[i].identity.node_id()
    }

    /// Node `me`'s policy for `peer` now: the topology's rules, `Volume` narrowed where the
    /// workload narrowed it, and the link's shaping.
    pub(crate) fn policy(&self, me: usize, peer: usize) -> tidesync::policy::Policy {
        let mut policy = self.layout.policy(me, peer, &self.narrowed);
        if let Some(link) = self.shaping.links.get(&(me, peer)) {
            policy.link = link.clone();
        }
        policy
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
}
