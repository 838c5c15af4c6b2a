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
    let (bytes, ex) = ship
        .export_bundle("hub", false, true, true, &|_| {})
        .unwrap();
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
    let (b1, _) = ship
        .export_bundle("hub", false, true, true, &|_| {})
        .unwrap();
    hub_x.import_bundle(&b1, false, &|_, _| {}).unwrap();
    // The hub's bundle back is the ship's receipt: the next export starts after b1.
    let (receipt, _) = hub_x
        .export_bundle("ship", false, true, true, &|_| {})
        .unwrap();
    ship.import_bundle(&receipt, false, &|_, _| {}).unwrap();
    put(&mut ship, "S-1", json!({"depth": 10, "note": "rechecked"}));
    put(&mut ship, "S-3", json!({"depth": 3}));
    let (b2, ex2) = ship
        .export_bundle("hub", false, true, true, &|_| {})
        .unwrap();
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
        let (bytes, _) = ship
            .export_bundle("hub", true, encrypt, true, &|_| {})
            .unwrap();
        let mut flipped = bytes.clone();
        let at = bytes.len() - 10;
        flipped[at] ^= 1;
        assert!(matches!(
            hub.import_bundle(&flipped, false, &|_, _| {}),
            Err(BundleError::Damaged { .. } | BundleError::Decrypt { .. })
        ));
        // Encrypted, the cut last chunk no longer authenticates: damaged.
        let cut = hub.import_bundle(&bytes[..bytes.len() - 1], false, &|_, _| {});
        assert!(
            matches!(
                (&cut, encrypt),
                (Err(BundleError::Truncated { .. }), false)
                    | (Err(BundleError::Damaged { .. }), true)
            ),
            "{cut:?}"
        );
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

/// A core over a store on disk in `dir/name` (files need one; each its own files directory),
/// with the key `[secret; 32]`.
fn on_disk(dir: &std::path::Path, secret: u8, name: &str) -> Core {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let store = crate::store::Store::create(&dir.join("store.redb")).unwrap();
    Core::new(
        name.into(),
        crate::identity::Identity::from_secret([secret; 32]),
        store,
        64,
        false,
    )
}

/// A ship and a hub over stores on disk in `dir`, each configured as the other's peer: the
/// ship's policy for the hub, and the hub's for the ship.
fn disk_pair(
    dir: &std::path::Path,
    ship_for_hub: crate::policy::Policy,
    hub_for_ship: crate::policy::Policy,
) -> (Core, Core) {
    let (mut ship, mut hub) = (on_disk(dir, 1, "ship"), on_disk(dir, 2, "hub"));
    let (s, h) = (ship.node_id(), hub.node_id());
    ship.set_policy(h, "hub".into(), ship_for_hub).unwrap();
    hub.set_policy(s, "ship".into(), hub_for_ship).unwrap();
    (ship, hub)
}

fn files_never() -> crate::policy::Policy {
    serde_json::from_value(json!({"files": "never"})).unwrap()
}

#[test]
fn files_go_in_the_bundle_or_in_a_later_one_once_the_peer_says_it_lacks_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ship, mut hub) = disk_pair(dir.path(), Default::default(), Default::default());
    let (s, h) = (ship.node_id(), hub.node_id());
    let image: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (hash, size) = ship.store().add_file(&mut &image[..], 0).unwrap();
    let reference = json!({"$file": hash.to_string(), "size": size, "name": "img-0001.jpg"});
    put(&mut ship, "V-1", json!({"image": reference}));

    // Metadata ashore first: the hub now wants the file from the ship.
    let (meta, ex) = ship
        .export_bundle("hub", false, true, false, &|_| {})
        .unwrap();
    assert_eq!((ex.files, ex.changes), (0, 1));
    assert!(meta.len() < 10_000, "no file bytes: {} bytes", meta.len());
    let r = hub.import_bundle(&meta, false, &|_, _| {}).unwrap();
    assert_eq!((r.new_changes, r.files, r.files_stored), (1, 0, 0));
    assert!(hub.store().want(&hash).unwrap().is_some());

    // The hub's bundle back says so, and the ship's next bundle carries the file although
    // no record is left to send.
    let (back, ex) = hub
        .export_bundle("ship", false, true, true, &|_| {})
        .unwrap();
    assert_eq!(ex.wants, 1);
    ship.import_bundle(&back, false, &|_, _| {}).unwrap();
    assert_eq!(ship.store().peer_lacks(&h).unwrap(), vec![(hash, size)]);
    let (with_files, ex) = ship
        .export_bundle("hub", false, true, true, &|_| {})
        .unwrap();
    assert_eq!((ex.changes, ex.files, ex.file_bytes), (0, 1, size));

    // A byte flipped inside the file (a plain bundle shows it as it is): the records are
    // imported, the file is refused and stays wanted; the honest bundle then stores it.
    let (plain, _) = ship
        .export_bundle("hub", true, false, true, &|_| {})
        .unwrap();
    let at = plain
        .windows(64)
        .position(|w| w == &image[1_000_000..1_000_064])
        .unwrap();
    let mut bad = plain.clone();
    bad[at] ^= 1;
    let mut hub2 = on_disk(dir.path(), 2, "hub2");
    hub2.set_policy(s, "ship".into(), Default::default())
        .unwrap();
    let err = hub2.import_bundle(&bad, false, &|_, _| {}).unwrap_err();
    assert!(
        matches!(&err, BundleError::FilesStopped { new_changes: 1, stored: 0, source }
            if matches!(**source, BundleError::Damaged { .. })),
        "{err}"
    );
    assert!(hub2.store().file(&hash).unwrap().is_none());
    assert!(hub2.store().want(&hash).unwrap().is_some());
    let r = hub2.import_bundle(&plain, false, &|_, _| {}).unwrap();
    assert_eq!((r.duplicates, r.files_stored), (1, 1));
    assert!(hub2.store().verify_file(&hash).unwrap());

    let r = hub.import_bundle(&with_files, false, &|_, _| {}).unwrap();
    assert_eq!((r.files, r.files_stored, r.file_bytes_stored), (1, 1, size));
    assert!(hub.store().want(&hash).unwrap().is_none());
    let (path, _) = hub.store().file(&hash).unwrap().unwrap();
    assert_eq!(std::fs::read(path).unwrap(), image);
    // Imported again, nothing more is stored.
    let r = hub.import_bundle(&with_files, false, &|_, _| {}).unwrap();
    assert_eq!(r.files_stored, 0);
}

#[test]
fn a_peer_whose_policy_keeps_files_home_gets_none_in_a_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ship, _hub) = disk_pair(dir.path(), files_never(), Default::default());
    let (hash, size) = ship.store().add_file(&mut &b"raw data"[..], 0).unwrap();
    put(
        &mut ship,
        "S-1",
        json!({"raw": {"$file": hash.to_string(), "size": size}}),
    );
    let (_, ex) = ship
        .export_bundle("hub", true, true, true, &|_| {})
        .unwrap();
    assert_eq!((ex.changes, ex.files), (1, 0));
}

#[test]
fn a_files_rule_widened_later_wants_the_files_objects_already_refer_to() {
    // Regression: switching a peer from `--files never` to `eager` fetched nothing for the
    // objects already held; only objects that changed again added wants.
    let dir = tempfile::tempdir().unwrap();
    let (mut ship, mut hub) = disk_pair(dir.path(), Default::default(), files_never());
    let s = ship.node_id();
    let (hash, size) = ship
        .store()
        .add_file(&mut &b"a sonar trace"[..], 0)
        .unwrap();
    put(
        &mut ship,
        "S-1",
        json!({"trace": {"$file": hash.to_string(), "size": size}}),
    );
    let (bytes, ex) = ship
        .export_bundle("hub", true, true, true, &|_| {})
        .unwrap();
    assert_eq!(ex.files, 1);
    let r = hub.import_bundle(&bytes, false, &|_, _| {}).unwrap();
    assert_eq!((r.new_changes, r.files, r.files_stored), (1, 1, 0));
    assert!(
        hub.store().want(&hash).unwrap().is_none(),
        "never: not wanted"
    );

    hub.set_policy(s, "ship".into(), Default::default())
        .unwrap();
    let want = hub
        .store()
        .want(&hash)
        .unwrap()
        .expect("wanted once the rule allows it");
    assert_eq!((want.claimant, want.sources.clone()), (s, vec![s]));
    let r = hub.import_bundle(&bytes, false, &|_, _| {}).unwrap();
    assert_eq!(r.files_stored, 1);
    assert!(hub.store().want(&hash).unwrap().is_none());
}
