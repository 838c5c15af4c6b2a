//! Topologies of simulated worlds: who links to whom, each node's policy for each peer, and
//! the same rules restated independently as what the invariants expect to pass or be kept.
//!
//! Every topology uses the same object types and the same rules, so that each world exercises
//! all of them wherever its shape allows:
//! - `Sample`, `Volume`, `Template`: synced everywhere;
//! - `Invoice`: skipped on every link, so it never leaves the node that wrote it;
//! - `Method`: owned by node 0. Node 0 sends it and takes no edits (`send-only`), its
//!   neighbours take it read-only from node 0, and links that do not touch node 0 skip it;
//! - hub topologies (`star`, `ships`): the hub takes each peer's `Sample`s under that peer's
//!   prefix, and sends them back to their origin only;
//! - `line`: the last node is an archive: its neighbour only sends to it (`direction send`),
//!   it only receives (`direction receive`), and `Template` reaches it as a view of `title`
//!   alone (`fields`);
//! - `Volume` is narrowed (skipped) on random links while the world runs and widened again
//!   before the heal;
//! - files (in worlds with files): a link that touches a ship carries files of at most
//!   [`SHIP_MAX_FILE_BYTES`] (`max-file-bytes`, set at both ends); other links carry all.
//! - `Sample` has priority (`priority`, sent ahead of log order) on every link that touches a
//!   ship and on the links whose two node numbers add up to a multiple of 3; it changes when
//!   things cross, never what.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use tidesync::policy::{Direction, Policy};
use tidesync_proto::TypeName;

/// The object types a world writes.
pub const TYPES: [&str; 5] = ["Sample", "Volume", "Template", "Invoice", "Method"];
/// The one field of `Template` the archive of a `line` world is sent.
pub const PUBLISHED_FIELD: &str = "title";
/// The largest file a link touching a ship carries, in bytes.
pub const SHIP_MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The shape of a world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topology {
    /// One hub (node 0) and labs that link only to it.
    Star,
    /// Every node links to every other.
    Mesh,
    /// A chain 0 – 1 – … – n-1 whose last node is a receive-only archive.
    Line,
    /// Hubs 0 and 1 linked to each other, labs split between them.
    TwoHubs,
    /// A hub (node 0), one lab always near it (node 1), and ships (2..) that are offline for
    /// long stretches.
    Ships,
}

impl Topology {
    pub const ALL: [Topology; 5] = [
        Topology::Star,
        Topology::Mesh,
        Topology::Line,
        Topology::TwoHubs,
        Topology::Ships,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Topology::Star => "star",
            Topology::Mesh => "mesh",
            Topology::Line => "line",
            Topology::TwoHubs => "two-hubs",
            Topology::Ships => "ships",
        }
    }

    /// The fewest nodes the shape makes sense with.
    pub fn min_nodes(self) -> usize {
        match self {
            Topology::TwoHubs => 4,
            _ => 3,
        }
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Topology {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Topology::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown topology {s:?} (star, mesh, line, two-hubs, ships)"))
    }
}

/// What a node is in its world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Hub,
    Lab,
    Ship,
    Archive,
}

/// A world's nodes and links, and the rules its policies follow.
#[derive(Debug, Clone)]
pub struct Layout {
    pub topology: Topology,
    pub roles: Vec<Role>,
    /// Links as (a, b) with a < b.
    pub links: Vec<(usize, usize)>,
}

impl Layout {
    pub fn new(topology: Topology, nodes: usize) -> Layout {
        let n = nodes.max(topology.min_nodes());
        let mut roles = vec![Role::Lab; n];
        let mut links = Vec::new();
        match topology {
            Topology::Star => {
                roles[0] = Role::Hub;
                links.extend((1..n).map(|i| (0, i)));
            }
            Topology::Mesh => {
                for a in 0..n {
                    links.extend((a + 1..n).map(|b| (a, b)));
                }
            }
            Topology::Line => {
                roles[n - 1] = Role::Archive;
                links.extend((1..n).map(|i| (i - 1, i)));
            }
            Topology::TwoHubs => {
                roles[0] = Role::Hub;
                roles[1] = Role::Hub;
                links.push((0, 1));
                links.extend((2..n).map(|i| (i % 2, i)));
            }
            Topology::Ships => {
                roles[0] = Role::Hub;
                links.push((0, 1));
                for (i, role) in roles.iter_mut().enumerate().skip(2) {
                    *role = Role::Ship;
                    links.push((0, i));
                }
            }
        }
        Layout {
            topology,
            roles,
            links,
        }
    }

    pub fn len(&self) -> usize {
        self.roles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }

    /// The node's name, as its peers know it.
    pub fn name(&self, i: usize) -> String {
        let role = match self.roles[i] {
            Role::Hub => "hub",
            Role::Lab => "lab",
            Role::Ship => "ship",
            Role::Archive => "archive",
        };
        format!("{role}{i}")
    }

    /// Whether the hub takes `peer`'s Samples under a prefix.
    pub fn prefixes(&self, me: usize, peer: usize) -> bool {
        matches!(self.topology, Topology::Star | Topology::Ships)
            && me == 0
            && matches!(self.roles[peer], Role::Lab | Role::Ship)
    }

    /// Whether `me` publishes `Template` to `peer` as a view.
    pub fn publishes_view(&self, me: usize, peer: usize) -> bool {
        self.roles[peer] == Role::Archive && me != peer
    }

    /// `me`'s policy for `peer`; `narrowed` holds the (me, peer) sides that skip `Volume` now.
    pub fn policy(&self, me: usize, peer: usize, narrowed: &BTreeSet<(usize, usize)>) -> Policy {
        let ty = |s: &str| TypeName::new(s).expect("simulation type names are valid");
        let mut p = Policy {
            skip: vec![ty("Invoice")],
            ..Policy::default()
        };
        if me == 0 {
            p.send_only.push(ty("Method"));
        } else if peer == 0 {
            p.read_only.push(ty("Method"));
        } else {
            p.skip.push(ty("Method"));
        }
        if narrowed.contains(&(me, peer)) {
            p.skip.push(ty("Volume"));
        }
        if self.prefixes(me, peer) {
            p.prefix = Some(format!("{}:", self.name(peer)));
            p.prefixed.push(ty("Sample"));
        }
        if self.roles[me] == Role::Archive {
            p.direction = Direction::Receive;
        }
        if self.touches_ship(me, peer) {
            p.max_file_bytes = Some(SHIP_MAX_FILE_BYTES);
        }
        if self.touches_ship(me, peer) || (me + peer).is_multiple_of(3) {
            // Samples cross ahead of the rest of the log (`Message::Ahead`).
            p.priority.push(ty("Sample"));
        }
        if self.publishes_view(me, peer) {
            p.direction = Direction::Send;
            p.fields
                .insert(ty("Template"), vec![PUBLISHED_FIELD.to_string()]);
        }
        p
    }

    fn touches_ship(&self, a: usize, b: usize) -> bool {
        self.roles[a] == Role::Ship || self.roles[b] == Role::Ship
    }

    /// Whether a file of `size` bytes may cross between neighbours `x` and `y` (restated).
    pub fn file_passes(&self, x: usize, y: usize, size: u64) -> bool {
        !self.touches_ship(x, y) || size <= SHIP_MAX_FILE_BYTES
    }

    /// Whether the workload may write `ty` at node `i` (writes there are acknowledged):
    /// `Method` only at its owner, node 0.
    pub fn writes(&self, i: usize, ty: &str) -> bool {
        ty != "Method" || i == 0
    }

    /// Whether a local write of `ty` at node `i` must be refused: `Method` next to its owner.
    pub fn refuses_write(&self, i: usize, ty: &str) -> bool {
        ty == "Method" && i != 0 && self.links.contains(&(0, i))
    }

    /// What the final policies let pass from `x` to its neighbour `y` for a document of type
    /// `ty` created by `origin`, restated from the rules in this module's header (not by
    /// calling the node's policy code, which is what is being checked).
    pub fn passes(&self, x: usize, y: usize, ty: &str, origin: Option<usize>) -> Pass {
        if self.roles[x] == Role::Archive {
            return Pass::No;
        }
        match ty {
            "Invoice" => Pass::No,
            "Method" if x != 0 && y != 0 => Pass::No,
            "Template" if self.publishes_view(x, y) => Pass::View,
            "Sample"
                if matches!(self.topology, Topology::Star | Topology::Ships)
                    && x == 0
                    && origin.is_some_and(|o| o != 0 && o != y) =>
            {
                Pass::No
            }
            _ => Pass::Yes,
        }
    }
}

/// How a document passes over one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Not at all.
    No,
    /// As itself: both ends hold the same heads and JSON.
    Yes,
    /// As a view of the published fields (the receiver's document is the sender's, projected).
    View,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topology_is_connected() {
        for t in Topology::ALL {
            for n in t.min_nodes()..8 {
                let l = Layout::new(t, n);
                let mut reached = BTreeSet::from([0]);
                loop {
                    let before = reached.len();
                    for &(a, b) in &l.links {
                        if reached.contains(&a) || reached.contains(&b) {
                            reached.insert(a);
                            reached.insert(b);
                        }
                    }
                    if reached.len() == before {
                        break;
                    }
                }
                assert_eq!(reached.len(), l.len(), "{t} with {n} nodes");
            }
        }
    }

    #[test]
    fn policies_validate() {
        for t in Topology::ALL {
            let l = Layout::new(t, 6);
            for &(a, b) in &l.links {
                for (me, peer) in [(a, b), (b, a)] {
                    let p = l.policy(me, peer, &BTreeSet::from([(me, peer)]));
                    assert_eq!(p.validate(), Ok(()), "{t}: {me} -> {peer}");
                }
            }
        }
    }
}
