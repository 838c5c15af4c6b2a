//! Equivocation in one document: finding the change a new one contradicts (same actor and
//! sequence number, another hash) and rebuilding the document without the contested changes
//! and everything that depends on them. Pure: the engine calls it with what it holds.

use automerge::{Automerge, Change, ChangeHash};
use tidesync_proto::{NodeId, SignedChange};

use crate::model::DocBans;

/// An equivocation the engine found in a received batch.
#[derive(Debug)]
pub struct Found {
    /// The node whose key signed both changes.
    pub author: NodeId,
    pub actor: Vec<u8>,
    pub seq: u64,
    /// The change the document already had: signed, when it arrived in the same batch, or
    /// its hash, for the shell to read from the log.
    pub first: Result<SignedChange, ChangeHash>,
    /// The change that contradicts it.
    pub second: SignedChange,
}

/// The change of `doc` that `change` contradicts: the same actor and sequence number under
/// another hash. Scans the document's changes; called only after Automerge refused `change`.
pub fn twin_in(doc: &Automerge, change: &Change) -> Option<ChangeHash> {
    let actor = change.actor_id();
    doc.get_changes(&[])
        .into_iter()
        .find(|c| c.actor_id() == actor && c.seq() == change.seq() && c.hash() != change.hash())
        .map(|c| c.hash())
}

/// Cut `actor` at `seq` in `bans` and rebuild `doc` from the changes the bans still allow.
/// Returns the rebuilt document and the changes of `doc` newly refused; `None` if Automerge
/// refuses to rebuild (the document is then left as it was, and the caller refuses the change
/// that revealed the equivocation).
pub fn cut(
    doc: &Automerge,
    bans: &mut DocBans,
    actor: Vec<u8>,
    seq: u64,
) -> Option<(Automerge, Vec<ChangeHash>)> {
    let mut trial = bans.clone();
    let lowest = trial.cuts.entry(actor).or_insert(seq);
    *lowest = (*lowest).min(seq);
    let mut kept = doc.get_changes(&[]);
    let mut newly = Vec::new();
    // A change is refused if it depends on a refused one; repeat until nothing more is
    // refused, whatever order the document lists its changes in.
    loop {
        let before = newly.len();
        kept.retain(|c| {
            if trial.refuses(c) {
                trial.banned.insert(c.hash());
                newly.push(c.hash());
                false
            } else {
                true
            }
        });
        if newly.len() == before {
            break;
        }
    }
    let mut rebuilt = Automerge::new();
    let applied =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rebuilt.apply_changes(kept)));
    if !matches!(applied, Ok(Ok(()))) {
        return None;
    }
    *bans = trial;
    Some((rebuilt, newly))
}

/// Splitmix64: the next epoch after a node's own change was refused, so that it never writes
/// again under an actor whose sequence numbers others may hold differently.
pub fn next_epoch(epoch: u64) -> u64 {
    let mut z = epoch.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ROOT, ReadDoc};

    fn write(doc: &mut Automerge, actor: &[u8], key: &str, value: i64) -> Change {
        doc.set_actor(ActorId::from(actor.to_vec()));
        let mut tx = doc.transaction();
        tx.put(ROOT, key, value).unwrap();
        let (hash, _) = tx.commit();
        doc.get_change_by_hash(&hash.unwrap()).unwrap()
    }

    #[test]
    fn a_cut_refuses_both_sides_and_their_dependents_in_any_order() {
        let (a, b) = ([1u8; 40], [2u8; 40]);
        let mut base = Automerge::new();
        let genesis = write(&mut base, &b, "x", 0);
        let mut left = base.fork();
        let mut right = base.fork();
        let c1 = write(&mut left, &a, "v", 1);
        let c2 = write(&mut right, &a, "v", 2);
        assert_eq!((c1.seq(), c1.actor_id()), (c2.seq(), c2.actor_id()));
        // An honest node built on the first side, and another wrote beside it.
        let dependent = write(&mut left, &b, "y", 3);
        let mut side = base.fork();
        let beside = write(&mut side, &[3u8; 40], "z", 4);
        left.apply_changes([beside.clone()]).unwrap();
        assert_eq!(twin_in(&left, &c2), Some(c1.hash()));
        let mut bans = DocBans::default();
        let (rebuilt, newly) = cut(&left, &mut bans, a.to_vec(), c1.seq()).unwrap();
        assert!(newly.contains(&c1.hash()) && newly.contains(&dependent.hash()));
        assert!(bans.refuses(&c2), "the other side is refused too");
        let mut heads = rebuilt.get_heads();
        heads.sort();
        let mut want = [genesis.hash(), beside.hash()];
        want.sort();
        assert!(heads.iter().all(|h| want.contains(h)));
        assert!(rebuilt.get_change_by_hash(&beside.hash()).is_some());
        // The node that had the other side ends with the same document.
        let mut other = right.clone();
        other.apply_changes([beside]).unwrap();
        let mut bans2 = DocBans::default();
        let (rebuilt2, _) = cut(&other, &mut bans2, a.to_vec(), c2.seq()).unwrap();
        let mut heads2 = rebuilt2.get_heads();
        heads2.sort();
        assert_eq!(heads, heads2);
        assert_eq!(
            rebuilt.get_changes(&[]).len(),
            rebuilt2.get_changes(&[]).len()
        );
    }

    #[test]
    fn next_epoch_moves() {
        assert_ne!(next_epoch(7), 7);
        assert_ne!(next_epoch(7), next_epoch(8));
    }
}
