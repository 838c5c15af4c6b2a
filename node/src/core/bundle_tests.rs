//! Bundles between in-memory cores: round trips, order independence, damaged files.

use super::*;
use crate::bundle::*;
use serde_json::json;
use tidesync_proto::DocId;
use tidesync_proto::{ObjectId, TypeName};

fn core(secret: u8, name: &str) -> Core {
    Core::in_memory(secret, name)
}

fn pair() -> (Core, Core) {
    let (mut ship, mut hub) = (core(1, "ship"), core(2, "hub"));
    let (s, h) = (ship.node_id(), hub.node_id());
    ship.set_policy(h, "hub".into(), Default::default())
        .unwrap();
    hub.set_policy(s, "ship".into(), Default::default())
        .unwrap();
    (ship, hub)
}

fn put(c: &mut Core, id: &str, v: serde_json::Value) {
    let (t, i) = (TypeName::new("Sample").unwrap(), ObjectId::new(id).unwrap());
    c.put(&t, &i, v.as_object().unwrap()).unwrap();
}

#[test]
fn a_bundle_round_trips_and_a_second_import_changes_nothing() {
    let (mut ship, mut hub) = pair();
    put(&mut ship, "S-1", json!({"depth": 120}));
    put(&mut ship, "S-2", json!({"depth": 80}));
    let (bytes, ex) = ship.export_bundle("hub", false, true, &|_| {}).unwrap();
    assert_eq!((ex.documents, ex.changes, ex.encrypted), (2, 2, true));
    let dry = hub.import_bundle(&bytes, true, &|_, _| {}).unwrap();
    assert_eq!((dry.added, dry.new_changes), (2, 2));
    assert_eq!(hub.last_seq().unwrap(), 0, "a dry run writes nothing");
    let first = hub.import_bundle(&bytes, false, &|_, _| {}).unwrap();
    assert_eq!((first.added, first.updated, first.rejected), (2, 0, 0));
    let seq = hub.last_seq().unwrap();
    let again = hub.import_bundle(&bytes, false, &|_, _| {}).unwrap();
    assert_eq!(
        (again.added, again.new_changes, again.duplicates),
        (0, 0, 2)
    );
    assert_eq!(hub.last_seq().unwrap(), seq);
    // The hub now holds the ship's log to the bundle's end.
    let rec = hub.store().peer(&ship.node_id()).unwrap();
    assert_eq!(rec.received.seq, 2);
}

fn state(c: &mut Core) -> Vec<(DocId, Vec<automerge::ChangeHash>, String)> {
    let mut v: Vec<_> = c
        .audit()
        .unwrap()
        .into_iter()
        .map(|a| (a.doc, a.heads, serde_json::to_string(&a.json).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn two_incremental_bundles_end_the_same_in_either_order() {
    let (mut ship, mut hub_x) = pair();
    // The same hub twice (one key, two stores), to import in both orders.
    let mut hub_y = core(2, "hub");
    hub_y
        .set_policy(ship.node_id(), "ship".into(), Default::default())
        .unwrap();
    put(&mut ship, "S-1", json!({"depth": 1}));
    put(&mut ship, "S-2", json!({"depth": 2}));
    let (b1, _) = ship.export_bundle("hub", false, true, &|_| {}).unwrap();
    hub_x.import_bundle(&b1, false, &|_, _| {}).unwrap();
    // The hub's bundle back is the ship's receipt: the next export starts after b1.
    let (receipt, _) = hub_x.export_bundle("ship", false, true, &|_| {}).unwrap();
    ship.import_bundle(&receipt, false, &|_, _| {}).unwrap();
    put(&mut ship, "S-1", json!({"depth": 10, "note": "rechecked"}));
    put(&mut ship, "S-3", json!({"depth": 3}));
    let (b2, ex2) = ship.export_bundle("hub", false, true, &|_| {}).unwrap();
    assert_eq!(
        (ex2.after, ex2.changes),
        (2, 2),
        "b2 carries only what b1 did not"
    );
    hub_x.import_bundle(&b2, false, &|_, _| {}).unwrap();
    let r = hub_y.import_bundle(&b2, false, &|_, _| {}).unwrap();
    assert_eq!(r.held, 1, "S-1's edit waits for its creation, in b1");
    hub_y.import_bundle(&b1, false, &|_, _| {}).unwrap();
    assert_eq!(hub_y.store().pending_count().unwrap(), 0);
    assert_eq!(state(&mut hub_x), state(&mut hub_y));
    assert_eq!(hub_y.store().peer(&ship.node_id()).unwrap().received.seq, 4);
}

#[test]
fn altered_truncated_and_misaddressed_bundles_are_refused_whole() {
    let (mut ship, mut hub) = pair();
    put(&mut ship, "S-1", json!({"depth": 120}));
    for encrypt in [true, false] {
        let (bytes, _) = ship.export_bundle("hub", true, encrypt, &|_| {}).unwrap();
        let mut flipped = bytes.clone();
        let at = bytes.len() - 10;
        flipped[at] ^= 1;
        assert!(matches!(
            hub.import_bundle(&flipped, false, &|_, _| {}),
            Err(BundleError::Damaged { .. } | BundleError::Decrypt { .. })
        ));
        assert!(matches!(
            hub.import_bundle(&bytes[..bytes.len() - 1], false, &|_, _| {}),
            Err(BundleError::Truncated { .. })
        ));
        assert!(matches!(
            hub.import_bundle(b"PK\x03\x04 not ours", false, &|_, _| {}),
            Err(BundleError::NotABundle)
        ));
        let mut other = core(3, "lab");
        other
            .set_policy(ship.node_id(), "ship".into(), Default::default())
            .unwrap();
        assert!(matches!(
            other.import_bundle(&bytes, false, &|_, _| {}),
            Err(BundleError::WrongRecipient { .. })
        ));
        assert_eq!(hub.last_seq().unwrap(), 0);
    }
}
