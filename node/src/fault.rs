//! Every deliberate fault, switched on only by simulations and tests, to prove that the
//! invariants and the receivers' checks catch real bugs: the engine's (`EngineFault`, set
//! per core by simulations) and the process's (`Fault`, from `TIDESYNC_FAULT`, for the
//! integration tests' real nodes).
//!
//! Each fault breaks one rule the sync engine relies on. A normal node never turns any on:
//! nothing in the config file or the API can, and `tidesync run` only knows the process faults
//! of [`Fault`]. `tidesync-sim --fault NAME` turns one on in every simulated node
//! and expects an invariant to fail (see `simulations/`).
//!
//! Faults take effect only in builds with the `fault-injection` cargo feature, which the
//! simulations and the integration tests turn on: without it [`Faults::set`] does nothing.

use std::fmt;

use automerge::Change;
use std::str::FromStr;
use tidesync_proto::{NodeId, SignedChange};

/// One deliberate bug in the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineFault {
    /// Store received changes whose signature does not verify (decoded, author unchecked).
    AcceptUnsigned,
    /// Never persist the checkpoint of a peer's log: every reconnect starts from nothing.
    ForgetCheckpoint,
    /// Move the checkpoint to the end of every received batch, even across a gap left by a
    /// batch that has not arrived.
    CheckpointSkipsGaps,
    /// Drop changes whose dependencies have not arrived instead of holding them.
    DropHeld,
    /// Ignore `skip` lists on both ends: skipped types are sent and taken.
    IgnoreSkip,
    /// Send as if no link were shaped: windows, budgets and rates are ignored.
    IgnoreLink,
}

impl EngineFault {
    /// Every fault, in the order the simulation's fault test runs them.
    pub const ALL: [EngineFault; 6] = [
        EngineFault::AcceptUnsigned,
        EngineFault::ForgetCheckpoint,
        EngineFault::CheckpointSkipsGaps,
        EngineFault::DropHeld,
        EngineFault::IgnoreSkip,
        EngineFault::IgnoreLink,
    ];

    /// The fault's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            EngineFault::AcceptUnsigned => "accept-unsigned",
            EngineFault::ForgetCheckpoint => "forget-checkpoint",
            EngineFault::CheckpointSkipsGaps => "checkpoint-skips-gaps",
            EngineFault::DropHeld => "drop-held",
            EngineFault::IgnoreSkip => "ignore-skip",
            EngineFault::IgnoreLink => "ignore-link",
        }
    }
}

impl fmt::Display for EngineFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault name that is not one of [`EngineFault::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown engine fault {0:?} (known: accept-unsigned, forget-checkpoint, checkpoint-skips-gaps, drop-held, ignore-skip, ignore-link)"
)]
pub struct UnknownFault(pub String);

impl FromStr for EngineFault {
    type Err = UnknownFault;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EngineFault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFault(s.to_string()))
    }
}

/// The faults switched on in one core; all off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Alter changes relayed from other authors before sending them ([`Fault::AlterRelayed`]).
    pub alter_relayed: bool,
    pub accept_unsigned: bool,
    pub forget_checkpoint: bool,
    pub checkpoint_skips_gaps: bool,
    pub drop_held: bool,
    /// Write and send as if no policy of ours applied ([`Fault::IgnorePolicy`]).
    pub ignore_own_policy: bool,
    /// Ignore `skip` lists on both ends ([`EngineFault::IgnoreSkip`]).
    pub ignore_skip: bool,
    /// Ignore every link's windows, budget and rate ([`EngineFault::IgnoreLink`]).
    pub ignore_link: bool,
    /// Send every other configured peer a twin of each of this node's own changes
    /// ([`Fault::Equivocate`]).
    pub equivocate: bool,
}

impl Faults {
    /// Switch `fault` on; does nothing without the `fault-injection` feature.
    pub fn set(&mut self, fault: EngineFault) {
        if !cfg!(feature = "fault-injection") {
            return;
        }
        match fault {
            EngineFault::AcceptUnsigned => self.accept_unsigned = true,
            EngineFault::ForgetCheckpoint => self.forget_checkpoint = true,
            EngineFault::CheckpointSkipsGaps => self.checkpoint_skips_gaps = true,
            EngineFault::DropHeld => self.drop_held = true,
            EngineFault::IgnoreSkip => self.ignore_skip = true,
            EngineFault::IgnoreLink => self.ignore_link = true,
        }
    }
}

impl Faults {
    /// Switch on what the process fault `fault` does in the core (the frame faults act in
    /// the network codec instead); does nothing without the `fault-injection` feature.
    pub fn set_process(&mut self, fault: Fault) {
        if !cfg!(feature = "fault-injection") {
            return;
        }
        match fault {
            Fault::AlterRelayed => self.alter_relayed = true,
            Fault::IgnorePolicy => self.ignore_own_policy = true,
            Fault::Equivocate => self.equivocate = true,
            Fault::None
            | Fault::GarbageFrames
            | Fault::TruncatedFrames
            | Fault::OversizedFrames
            | Fault::CorruptFiles => {}
        }
    }
}

/// Test-only faults, chosen with the environment variable `TIDESYNC_FAULT` in builds with the
/// `fault-injection` cargo feature (the integration tests turn it on). They exist so that
/// integration tests can make a real node misbehave. A build without the feature, such as
/// `cargo build --release -p tidesync`, ignores the variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Alter changes relayed from other authors (a dishonest hub).
    AlterRelayed,
    /// Send frames whose bodies are random bytes.
    GarbageFrames,
    /// Send a frame header, then only part of the body.
    TruncatedFrames,
    /// Send a frame header announcing more than `MAX_FRAME_BYTES`.
    OversizedFrames,
    /// Ignore this node's own policies when writing and sending (a misconfigured or
    /// malicious peer): read-only types can be written, and everything is offered to every
    /// peer. Receivers must still refuse what their policies do not allow.
    IgnorePolicy,
    /// Equivocate: send the configured peers at odd places in key order a twin of each of
    /// this node's own changes that is not a creation: the same actor, sequence number and
    /// dependencies, other contents, signed. Receivers must detect it and converge.
    Equivocate,
    /// Flip a byte in every file segment served (a peer with rotted or lying storage):
    /// receivers must catch it by verification and fetch the segment elsewhere.
    CorruptFiles,
}

impl Fault {
    pub const ENV: &'static str = "TIDESYNC_FAULT";

    /// The fault named by `TIDESYNC_FAULT`, if any; always `None` without the
    /// `fault-injection` feature.
    pub fn from_env() -> Fault {
        if !cfg!(feature = "fault-injection") {
            return Fault::None;
        }
        Self::named(std::env::var(Self::ENV).ok().as_deref())
    }

    /// The fault called `name` (as in `TIDESYNC_FAULT`); `None` for anything else.
    pub(crate) fn named(name: Option<&str>) -> Fault {
        match name {
            Some("alter-relayed") => Fault::AlterRelayed,
            Some("garbage-frames") => Fault::GarbageFrames,
            Some("truncated-frames") => Fault::TruncatedFrames,
            Some("oversized-frames") => Fault::OversizedFrames,
            Some("ignore-policy") => Fault::IgnorePolicy,
            Some("equivocate") => Fault::Equivocate,
            Some("corrupt-files") => Fault::CorruptFiles,
            _ => Fault::None,
        }
    }
}

/// Test-only fault: alter a change this node did not author, keeping it decodable, as a
/// dishonest relay would.
pub(crate) fn tamper_if_relayed(change: &mut SignedChange, me: &NodeId) {
    let Ok(decoded) = Change::from_bytes(change.bytes.clone()) else {
        return;
    };
    if NodeId::from_actor(decoded.actor_id().to_bytes()) == Some(*me) {
        return;
    }
    if let Some(last) = change.bytes.last_mut() {
        *last ^= 0x01;
    }
    if let Ok(altered) = Change::from_bytes(change.bytes.clone()) {
        let hash = altered.hash();
        change.bytes[4..8].copy_from_slice(&hash.0[..4]);
    }
}

/// Test-only fault: whether an equivocating node sends `peer` twins (see
/// [`Fault::Equivocate`]), given its configured peers in key order.
pub(crate) fn gets_twins<'a>(mut peers: impl Iterator<Item = &'a NodeId>, peer: &NodeId) -> bool {
    peers.position(|p| p == peer).is_some_and(|i| i % 2 == 1)
}

/// Test-only fault: the twin of `change`, one of this node's own changes of `doc`: the same
/// actor, sequence number and dependencies, another field written, signed with `key`. `None`
/// for a creation or a change `doc` does not hold.
pub(crate) fn twin(
    doc: &automerge::Automerge,
    change: &SignedChange,
    key: &ed25519_dalek::SigningKey,
    me: &NodeId,
) -> Option<SignedChange> {
    use automerge::transaction::{CommitOptions, Transactable};
    let c = Change::from_bytes(change.bytes.clone()).ok()?;
    if c.seq() <= 1 || NodeId::from_actor(c.actor_id().to_bytes()) != Some(*me) {
        return None;
    }
    let mut fork = doc.fork_at(c.deps()).ok()?;
    fork.set_actor(c.actor_id().clone());
    let mut tx = fork.transaction();
    tx.put(automerge::ROOT, "equivocated", c.hash().to_string())
        .ok()?;
    let (hash, _) = tx.commit_with(CommitOptions::default().with_time(c.timestamp()));
    let twin = automerge::ReadDoc::get_change_by_hash(&fork, &hash?)?;
    (twin.seq() == c.seq()).then(|| SignedChange::sign(key, change.doc, &twin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_named_and_off_by_default() {
        assert_eq!(Fault::named(Some("garbage-frames")), Fault::GarbageFrames);
        assert_eq!(Fault::named(Some("no-such-fault")), Fault::None);
        assert_eq!(Fault::named(None), Fault::None);
    }

    #[test]
    fn every_fault_parses_from_its_name() {
        for f in EngineFault::ALL {
            assert_eq!(f.name().parse::<EngineFault>(), Ok(f));
        }
        assert!("no-such-fault".parse::<EngineFault>().is_err());
    }
}
