//! Tests of the bounded change reader: agreement with Automerge on real changes, and every
//! crafted bomb refused before Automerge sees it.

use super::*;
use crate::change::{SignedChange, VerifyError};
use crate::ids::{DocId, NodeId, ObjectId, TypeName, actor_id};
use automerge::{Automerge, ROOT, transaction::Transactable};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn node() -> NodeId {
    NodeId(key().verifying_key().to_bytes())
}

fn doc_id() -> DocId {
    DocId::derive(
        &node(),
        &TypeName::new("Sample").unwrap(),
        &ObjectId::new("S-1").unwrap(),
    )
}

fn crafted(columns: &[(u32, Vec<u8>)], compressed: bool) -> Vec<u8> {
    craft::chunk(&actor_id(&node(), 1), &[], columns, compressed)
}

fn signed(bytes: Vec<u8>) -> SignedChange {
    craft::sign(&key(), doc_id(), bytes)
}

use crate::craft::{self, run, sleb};

fn real_change(fields: &[(String, i64)], seq_changes: usize) -> Vec<automerge::Change> {
    let mut doc = Automerge::new().with_actor(actor_id(&node(), 3).into());
    let mut out = Vec::new();
    for round in 0..seq_changes.max(1) {
        let mut tx = doc.transaction();
        for (k, v) in fields {
            tx.put(ROOT, k.as_str(), *v + round as i64).unwrap();
        }
        let list = tx
            .put_object(ROOT, format!("list{round}"), automerge::ObjType::List)
            .unwrap();
        tx.insert(&list, 0, "a").unwrap();
        tx.insert(&list, 1, "b").unwrap();
        tx.commit();
        out.push(doc.get_last_local_change().unwrap());
    }
    out
}

#[test]
fn real_changes_read_as_automerge_reads_them() {
    let fields: Vec<(String, i64)> = (0..50).map(|i| (format!("f{i}"), i)).collect();
    for change in real_change(&fields, 3) {
        let bytes = change.raw_bytes().to_vec();
        let header = ChangeHeader::parse(&bytes).unwrap();
        assert_eq!(header.hash, change.hash().0);
        assert_eq!(header.seq, change.seq());
        assert_eq!(header.start_op, u64::from(change.start_op()));
        assert_eq!(header.actor, change.actor_id().to_bytes());
        let deps: Vec<[u8; 32]> = change.deps().iter().map(|d| d.0).collect();
        assert_eq!(header.deps, deps);
        assert_eq!(header.check_ops(&bytes).unwrap(), change.len() as u64);
    }
}

proptest! {
    #[test]
    fn any_real_change_reads_as_automerge_reads_it(
        fields in proptest::collection::vec(("[a-z]{1,12}", any::<i64>()), 0..40),
        rounds in 1usize..4,
    ) {
        for change in real_change(&fields, rounds) {
            let bytes = change.raw_bytes().to_vec();
            let header = ChangeHeader::parse(&bytes).unwrap();
            prop_assert_eq!(header.hash, change.hash().0);
            prop_assert_eq!(header.check_ops(&bytes).unwrap(), change.len() as u64);
        }
    }

    // Arbitrary bytes never panic the reader, and whatever it accepts is bounded.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(h) = ChangeHeader::parse(&bytes) {
            let _ = h.check_ops(&bytes);
        }
    }
}

// Regression: a change whose action column claims a run of 2^62 ops made Automerge's decoder
// loop for ever (SIGTERM could not stop the node). The op count is now bounded first.
#[test]
fn a_run_of_two_to_the_62_ops_is_refused_before_automerge() {
    let bomb = crafted(&craft::op_count_bomb(), false);
    let header = ChangeHeader::parse(&bomb).unwrap();
    assert!(matches!(
        header.check_ops(&bomb),
        Err(ChunkError::OverLimit { .. })
    ));
    let err = signed(bomb).verify().unwrap_err();
    assert!(matches!(err, VerifyError::Malformed { .. }), "{err}");
    // A null run and a boolean run are bounded alike.
    let mut nulls = Vec::new();
    sleb(0, &mut nulls);
    uleb_bytes(1 << 40, &mut nulls);
    let mut bools = Vec::new();
    uleb_bytes(1 << 40, &mut bools);
    for cols in [vec![(4 << 4 | 2, nulls)], vec![(3 << 4 | 4, bools)]] {
        let bomb = crafted(&cols, false);
        assert!(signed(bomb).verify().is_err());
    }
}

// Regression: an op naming an object counter of 2^32 made Automerge 0.12 `unwrap()` a failed
// conversion, and the panic killed the node's actor. Counters are now bounded to 32 bits.
#[test]
fn a_counter_of_two_to_the_32_is_refused() {
    let bomb = crafted(&craft::counter_bomb(), false);
    assert!(matches!(
        ChangeHeader::parse(&bomb).unwrap().check_ops(&bomb),
        Err(ChunkError::OverLimit {
            what: "counter",
            ..
        })
    ));
    let mut delta = Vec::new();
    sleb(2, &mut delta);
    sleb(1 << 31, &mut delta);
    let bomb = crafted(&[(1 << 4 | 3, delta)], false);
    assert!(
        ChangeHeader::parse(&bomb)
            .unwrap()
            .check_ops(&bomb)
            .is_err()
    );
    // An actor index past the change's actors.
    let bomb = crafted(&[(1, run(1, 1))], false);
    assert!(
        ChangeHeader::parse(&bomb)
            .unwrap()
            .check_ops(&bomb)
            .is_err()
    );
}

// Regression: Automerge inflated compressed change chunks with no limit (a 1 MiB bundle took
// 3 GiB), and a relay could re-encode a change without breaking its signature. Compressed
// chunks and deflated columns are refused.
#[test]
fn compressed_chunks_and_deflated_columns_are_refused() {
    let compressed = crafted(&[], true);
    assert_eq!(
        ChangeHeader::parse(&compressed).unwrap_err(),
        ChunkError::Compressed
    );
    let deflated = crafted(&[(4 << 4 | 0x08 | 2, vec![1, 2, 3])], false);
    assert_eq!(
        ChangeHeader::parse(&deflated).unwrap_err(),
        ChunkError::Compressed
    );
    // Automerge itself compresses large changes when asked for `bytes()`; ours are raw.
    let fields: Vec<(String, i64)> = (0..2000).map(|i| (format!("field{i}"), i)).collect();
    let mut change = real_change(&fields, 1).remove(0);
    let raw = change.raw_bytes().to_vec();
    assert!(ChangeHeader::parse(&raw).is_ok());
    let packed = change.bytes().to_vec();
    assert_ne!(packed, raw, "automerge should compress this change");
    assert_eq!(
        ChangeHeader::parse(&packed).unwrap_err(),
        ChunkError::Compressed
    );
}

#[test]
fn the_signature_is_checked_before_the_ops() {
    let bomb = crafted(&craft::op_count_bomb(), false);
    let mut forged = signed(bomb);
    forged.signature[0] ^= 1;
    assert!(matches!(
        forged.verify(),
        Err(VerifyError::BadSignature { .. })
    ));
}

#[test]
fn oversized_truncated_and_trailing_chunks_are_refused() {
    let big = vec![0u8; MAX_CHANGE_BYTES + 1];
    assert!(matches!(
        ChangeHeader::parse(&big),
        Err(ChunkError::TooLarge { .. })
    ));
    let good = crafted(&[(4 << 4 | 2, run(1, 1))], false);
    for cut in 0..good.len() {
        assert!(ChangeHeader::parse(&good[..cut]).is_err(), "cut at {cut}");
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(
        ChangeHeader::parse(&trailing),
        Err(ChunkError::Trailing(1))
    ));
    // A length prefix claiming 2^60 bytes is refused without allocating.
    let mut huge = MAGIC.to_vec();
    huge.extend_from_slice(&[0, 0, 0, 0, CHUNK_CHANGE]);
    uleb_bytes(1 << 60, &mut huge);
    assert!(matches!(
        ChangeHeader::parse(&huge),
        Err(ChunkError::Truncated(_))
    ));
}
