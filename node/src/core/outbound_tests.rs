//! What crosses in batches between in-memory cores: frame limits, views, carried references.

use super::sync_tests::{Sent, connect, push};
use super::*;
use crate::model::*;
use crate::policy::{Direction, Policy};
use crate::replica::outbound::*;
use crate::sync::Outgoing;
use serde_json::{Value as Json, json};
use std::collections::VecDeque;
use tidesync_proto::wire::MAX_FRAME_BYTES;
use tidesync_proto::wire::{self, Message};
use tidesync_proto::{Checkpoint, DocHeader, SignedChange};
use tidesync_proto::{ObjectId, TypeName};

fn names(ty: &str, id: &str) -> (TypeName, ObjectId) {
    (TypeName::new(ty).unwrap(), ObjectId::new(id).unwrap())
}

fn put(c: &mut Core, ty: &str, id: &str, v: Json) {
    let (t, i) = names(ty, id);
    c.put(&t, &i, v.as_object().unwrap()).unwrap();
}

fn get(c: &mut Core, ty: &str, id: &str) -> Option<Json> {
    let (t, i) = names(ty, id);
    c.get(&t, &i).ok().map(Json::Object)
}

/// What crossed while settling: every `Changes` frame's encoded size and change count,
/// by sender.
#[derive(Default)]
struct Traffic {
    frames: Vec<(usize, usize, usize)>,
}

/// Deliver every request and response until nothing is left, checking that every frame
/// encodes within `SYNC_BATCH_BYTES`.
fn settle(cores: &mut [Core], mut queue: VecDeque<(usize, Outgoing)>) -> Traffic {
    let mut traffic = Traffic::default();
    while let Some((from, (to_node, msg))) = queue.pop_front() {
        let to = cores.iter().position(|c| c.node_id() == to_node).unwrap();
        let from_node = cores[from].node_id();
        if let Message::Changes { changes, .. } = &msg {
            let len = wire::encode(&msg).unwrap().len();
            assert!(len <= SYNC_BATCH_BYTES, "a frame of {len} bytes");
            traffic.frames.push((from, len, changes.len()));
        }
        let (reply, more) = cores[to].sent_on_request(from_node, msg).unwrap();
        queue.extend(more.into_iter().map(|o| (to, o)));
        let back = cores[from].sent_on_response(to_node, reply).unwrap();
        queue.extend(back.into_iter().map(|o| (from, o)));
    }
    traffic
}

fn pair(a_for_b: Policy, b_for_a: Policy) -> Vec<Core> {
    let mut cores = vec![Core::in_memory(1, "a"), Core::in_memory(2, "b")];
    let (na, nb) = (cores[0].node_id(), cores[1].node_id());
    cores[0].set_policy(nb, "b".into(), a_for_b).unwrap();
    cores[1].set_policy(na, "a".into(), b_for_a).unwrap();
    cores
}

fn big(c: char, len: usize) -> Json {
    json!({ "data": c.to_string().repeat(len) })
}

// Bug: the byte limit was checked before a change was added, so two 4 MiB changes made
// one frame over MAX_FRAME_BYTES.
#[test]
fn large_changes_travel_in_separate_frames_and_all_arrive() {
    let mut cores = pair(Policy::default(), Policy::default());
    let len = 4 * 1024 * 1024;
    put(&mut cores[0], "Blob", "B-1", big('a', len));
    put(&mut cores[0], "Blob", "B-2", big('b', len));
    put(&mut cores[0], "Sample", "after", json!({"x": 1}));
    let q = connect(&mut cores, 0, 1);
    let traffic = settle(&mut cores, q);
    assert!(traffic.frames.iter().filter(|f| f.0 == 0).count() >= 2);
    assert!(get(&mut cores[1], "Blob", "B-1").is_some());
    assert!(get(&mut cores[1], "Blob", "B-2").is_some());
    assert!(get(&mut cores[1], "Sample", "after").is_some());
}

// Bug: a local write whose change no frame could carry was stored, and then retried
// forever.
#[test]
fn a_local_change_over_the_limit_is_refused_before_anything_is_stored() {
    let mut c = Core::in_memory(1, "a");
    let (t, i) = names("Blob", "huge");
    let fields = big('z', MAX_LOCAL_CHANGE_BYTES);
    let err = c.put(&t, &i, fields.as_object().unwrap()).unwrap_err();
    assert!(err.to_string().contains("MAX_LOCAL_CHANGE_BYTES"), "{err}");
    assert_eq!(c.last_seq().unwrap(), 0);
    assert!(get(&mut c, "Blob", "huge").is_none());
}

// Bug: a stored change larger than any frame (from a node with other limits) was sent
// again and again, and nothing behind it ever went out.
#[test]
fn a_stored_change_no_frame_can_carry_is_skipped_counted_once_and_blocks_nothing() {
    let mut cores = pair(Policy::default(), Policy::default());
    let nb = cores[1].node_id();
    put(&mut cores[0], "Sample", "before", json!({"x": 1}));
    // Written past the local limit, as an older node would have stored it.
    let (t, i) = names("Blob", "huge");
    let fields = big('z', SYNC_BATCH_CONTENT_BYTES);
    let out = cores[0]
        .replica()
        .engine()
        .local_write(
            0,
            &t,
            &i,
            None,
            crate::replica::engine::WriteOp::Put(fields.as_object().unwrap()),
        )
        .unwrap();
    let crate::replica::engine::WriteOutcome::Changed(p) = out else {
        panic!("no change")
    };
    cores[0].store().commit_writes(&[&p]).unwrap();
    put(&mut cores[0], "Sample", "after", json!({"x": 2}));
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    assert!(get(&mut cores[1], "Sample", "before").is_some());
    assert!(get(&mut cores[1], "Sample", "after").is_some());
    assert!(get(&mut cores[1], "Blob", "huge").is_none());
    assert_eq!(cores[0].store().oversized_count(&nb).unwrap(), 1);
    let last = cores[0].last_seq().unwrap();
    assert_eq!(cores[0].store().peer(&nb).unwrap().acked, last);
    // A reconnect scans nothing again and counts it no more.
    cores[0].on_disconnected(&nb);
    let na = cores[0].node_id();
    cores[1].on_disconnected(&na);
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    assert_eq!(cores[0].store().oversized_count(&nb).unwrap(), 1);
}

// Bug: every edit of a published object resent its view's whole history.
#[test]
fn a_view_sends_only_the_changes_the_peer_lacks() {
    let ty = TypeName::new("Entity").unwrap();
    let publish = Policy {
        direction: Direction::Send,
        types: vec![ty.clone()],
        fields: [(ty.clone(), vec!["title".into()])].into(),
        ..Policy::default()
    };
    let take = Policy {
        direction: Direction::Receive,
        ..Policy::default()
    };
    let mut cores = pair(publish, take);
    put(
        &mut cores[0],
        "Entity",
        "E-1",
        json!({"title": "t0", "secret": "s"}),
    );
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    let mut sent = 0;
    for i in 1..=30 {
        put(
            &mut cores[0],
            "Entity",
            "E-1",
            json!({"title": format!("t{i}"), "secret": i}),
        );
        let q = push(&mut cores, 0);
        let traffic = settle(&mut cores, q);
        sent += traffic.frames.iter().map(|f| f.2).sum::<usize>();
    }
    assert_eq!(
        get(&mut cores[1], "Entity", "E-1"),
        Some(json!({"title": "t30"}))
    );
    // One new view change per edit; the whole history would be 465.
    assert_eq!(sent, 30);
}

fn refs_policies() -> (Policy, Policy) {
    let volume = TypeName::new("Volume").unwrap();
    let refs = [(
        volume.clone(),
        vec![crate::policy::RefField::try_from("label_trees:LabelTree".to_string()).unwrap()],
    )]
    .into();
    let a = Policy {
        types: vec![volume.clone()],
        refs,
        ..Policy::default()
    };
    (a.clone(), a)
}

// Bug: a referenced object that did not fit the batch of the object referencing it was
// skipped for good, and the receiver took a carried object only alongside its referrer.
#[test]
fn a_referenced_object_that_cannot_share_a_batch_follows_and_is_taken() {
    let (pa, pb) = refs_policies();
    let mut cores = pair(pa, pb);
    // Two objects of 4.5 MiB: each fits a frame, the two together do not.
    let len = 4 * 1024 * 1024 + 512 * 1024;
    put(&mut cores[0], "LabelTree", "LT-1", big('l', len));
    let mut vol = big('v', len);
    vol["label_trees"] = json!(["LabelTree/LT-1"]);
    put(&mut cores[0], "Volume", "V-1", vol);
    let q = connect(&mut cores, 0, 1);
    let traffic = settle(&mut cores, q);
    assert!(
        traffic
            .frames
            .iter()
            .filter(|f| f.0 == 0 && f.2 > 0)
            .count()
            >= 2
    );
    assert!(get(&mut cores[1], "Volume", "V-1").is_some());
    assert!(get(&mut cores[1], "LabelTree", "LT-1").is_some());
    let nb = cores[1].node_id();
    assert!(cores[0].store().owed_refs(&nb).unwrap().is_empty());
}

// Without a referencing object taken from the peer, a carried type is still refused.
#[test]
fn an_unreferenced_object_of_a_type_not_taken_is_still_refused() {
    let (pa, pb) = refs_policies();
    let mut cores = pair(Policy::default(), pb);
    let _ = pa;
    put(&mut cores[0], "LabelTree", "LT-9", json!({"x": 1}));
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    assert!(get(&mut cores[1], "LabelTree", "LT-9").is_none());
}

fn change(len: usize) -> SignedChange {
    SignedChange {
        doc: DocId([3; 16]),
        bytes: vec![7; len],
        signature: [9; 64],
    }
}

#[test]
fn counted_sizes_are_the_encoded_sizes() {
    for len in [0, 1, 127, 128, 16_383, 16_384, 300_000] {
        let c = change(len);
        let exact = postcard::to_stdvec(&c).expect("encode").len();
        assert_eq!(change_wire_bytes(&c), exact, "change of {len} bytes");
    }
    let h = DocHeader {
        doc: DocId([1; 16]),
        origin: NodeId([2; 32]),
        ty: TypeName::new("Sample").expect("type"),
        id: ObjectId::new("x".repeat(200)).expect("id"),
    };
    let exact = postcard::to_stdvec(&h).expect("encode").len();
    assert_eq!(header_wire_bytes(&h), exact);
}

#[test]
fn a_full_batch_stays_under_the_frame_limit() {
    // The largest batch the budget admits, with the largest message fields, encodes under
    // MAX_FRAME_BYTES.
    let header = DocHeader {
        doc: DocId([1; 16]),
        origin: NodeId([2; 32]),
        ty: TypeName::new("T".repeat(tidesync_proto::ids::MAX_TYPE_NAME_BYTES)).expect("type"),
        id: ObjectId::new("i".repeat(tidesync_proto::ids::MAX_OBJECT_ID_BYTES)).expect("id"),
    };
    let one = change(MAX_LOCAL_CHANGE_BYTES);
    let mut used = header_wire_bytes(&header) + change_wire_bytes(&one);
    let mut changes = vec![one];
    // The filler's own fields: document id, length varint, signature and its length.
    let filler = change(SYNC_BATCH_CONTENT_BYTES - used - (16 + 4 + 65));
    used += change_wire_bytes(&filler);
    assert!(used <= SYNC_BATCH_CONTENT_BYTES);
    changes.push(filler);
    let msg = Message::Changes {
        batch: u64::MAX,
        after: u64::MAX,
        docs: vec![header],
        changes,
        upto: Checkpoint {
            seq: u64::MAX,
            hash: [0xff; 32],
        },
        tip: u64::MAX,
    };
    let frame = wire::encode(&msg).expect("encode");
    assert!(frame.len() <= SYNC_BATCH_BYTES, "{} bytes", frame.len());
    assert!(frame.len() < MAX_FRAME_BYTES);
}
