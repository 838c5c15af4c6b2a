//! Format fixtures: a store, one wire frame of every message and a bundle, written once per
//! format version and committed: `node/tests/fixtures/v1/` by the code as it stood before the
//! architecture change (issue 13: store 3, protocol 2, bundle 1), `v2/` by the code of issue 14
//! (store 4, protocol 3, bundle 2), `v3/` by the code that gave views their own ids and
//! recorded equivocations (store 5, protocol 4, bundle 3), `v4/` by issue 16's code (store 7,
//! protocol 5 with the fleet's status records, bundle 3), `v5/` by the ships issue's code
//! (store 7, protocol 6 with the codec byte and zstd, bundle 3), `v6/` by the code that put
//! files in bundles (store 8 with `peer_lacks_v1`, protocol 6, bundle 4: streamed, records
//! compressed, files after them), `v7/` by the code that sends priority types ahead of log
//! order (store 9 with `sent_ahead_v1`, protocol 7 with `Ahead`, bundle 4). Today's code opens (migrating) every older store, reads the
//! newest frames and bundle, and refuses older frames and bundles with their version named. Each test reads them with today's code and must find exactly
//! what the writer recorded beside them: the proof that no disk, wire or bundle format changed
//! by accident. A deliberate format change raises that format's version and adds fixtures; it
//! never rewrites these.
//!
//! The writer is `write_fixtures` (ignored): `TIDESYNC_WRITE_FIXTURES=1 cargo test -p tidesync
//! --test fixtures -- --ignored write_fixtures`. It refuses to overwrite existing fixtures.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value as Json, json};
use tidesync::core::Core;
use tidesync::identity::Identity;
use tidesync::policy::Policy;
use tidesync::store::Store;
use tidesync_proto::wire::{self, Checkpoint, Message};
use tidesync_proto::{NodeId, ObjectId, TypeName};

/// The fixed clock of the writer, Unix milliseconds.
const CLOCK_MS: i64 = 1_780_000_000_000;
const HUB_SECRET: u8 = 7;
const LAB_SECRET: u8 = 8;

/// The fixtures of the current formats.
fn dir() -> PathBuf {
    dir_of("v7")
}

fn dir_of(version: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(version)
}

fn core(secret: u8, name: &str, store: Store, epoch: u64) -> Core {
    Core::with_clock(
        name.into(),
        Identity::from_secret([secret; 32]),
        store,
        64,
        false,
        epoch,
        Arc::new(|| CLOCK_MS),
    )
}

fn names(ty: &str, id: &str) -> (TypeName, ObjectId) {
    (
        TypeName::new(ty).expect("a type name"),
        ObjectId::new(id).expect("an object id"),
    )
}

fn put(c: &mut Core, ty: &str, id: &str, fields: Json) {
    let (ty, id) = names(ty, id);
    let Json::Object(fields) = fields else {
        panic!("fields are an object")
    };
    c.put(&ty, &id, &fields).expect("a put");
}

/// Run the sync protocol between two cores in this process until nothing is left to deliver;
/// every message that crosses is handed to `seen`.
fn settle(cores: &mut [&mut Core; 2], mut seen: impl FnMut(&Message)) {
    let ids = [cores[0].node_id(), cores[1].node_id()];
    let mut queue: VecDeque<(usize, Message)> = VecDeque::new();
    for (i, c) in cores.iter_mut().enumerate() {
        c.on_connected(ids[1 - i]).expect("connect");
        for (_, m) in c.take_outbox().sends {
            queue.push_back((i, m));
        }
    }
    let mut steps = 0;
    while let Some((from, msg)) = queue.pop_front() {
        steps += 1;
        assert!(steps < 10_000, "the sync never settled");
        seen(&msg);
        let to = 1 - from;
        let answer = cores[to]
            .on_request(ids[from], msg, None)
            .expect("a request");
        seen(&answer);
        for (_, m) in cores[to].take_outbox().sends {
            queue.push_back((to, m));
        }
        cores[from]
            .on_response(ids[to], answer)
            .expect("a response");
        for (_, m) in cores[from].take_outbox().sends {
            queue.push_back((from, m));
        }
    }
}

/// What a store holds, as plain JSON: every document audited (record, heads, JSON, each
/// stored signature checked), the whole change feed, every object's history, status without
/// the file size, and the peer records.
fn digest(core: &mut Core, peers: &[NodeId]) -> Json {
    let audit: Vec<Json> = core
        .audit()
        .expect("an audit")
        .into_iter()
        .map(|d| {
            json!({
                "doc": d.doc.to_string(),
                "record": serde_json::to_value(&d.record).expect("a record"),
                "heads": d.heads.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                "json": d.json,
                "deleted": d.deleted,
                "changes": d.changes.iter().map(|c| json!({
                    "hash": c.hash.to_string(),
                    "author": c.author.map(|a| a.to_string()),
                    "signature": c.signature.is_ok(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let feed = core.changes(0, 10_000).expect("the change feed");
    let mut histories = Map::new();
    for d in core.store().docs().expect("the documents") {
        let (_, record) = d;
        let h = core
            .history(&record.ty, &record.local_id)
            .expect("a history");
        histories.insert(
            format!("{}/{}", record.ty, record.local_id),
            serde_json::to_value(h).expect("history"),
        );
    }
    let mut status = serde_json::to_value(core.status(&[]).expect("status")).expect("status");
    status["store_bytes"] = Json::Null;
    let records: Vec<Json> = peers
        .iter()
        .map(|p| {
            serde_json::to_value(core.store().peer(p).expect("a peer record")).expect("a record")
        })
        .collect();
    json!({
        "audit": audit,
        "feed": serde_json::to_value(feed).expect("feed"),
        "histories": histories,
        "status": status,
        "peer_records": records,
        "held": core.store().pending_count().expect("held count"),
        "collisions": core.store().collision_count().expect("collision count"),
    })
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

fn write_json(path: &Path, value: &Json) {
    let text = serde_json::to_string_pretty(value).expect("JSON") + "\n";
    std::fs::write(path, text).expect("writing a fixture");
}

/// Open a copy of the fixture store (opening may migrate; the fixture itself stays as it was
/// written).
fn open_copy(from: &Path, name: &str, secret: u8, node: &str) -> (tempfile::TempDir, Core) {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let path = tmp.path().join("store.redb");
    std::fs::copy(from.join(name), &path).expect("copying the fixture store");
    let store = Store::open(&path, 1 << 20).expect("today's code opens the fixture store");
    (tmp, core(secret, node, store, 99))
}

fn ids() -> (NodeId, NodeId) {
    (
        Identity::from_secret([HUB_SECRET; 32]).node_id(),
        Identity::from_secret([LAB_SECRET; 32]).node_id(),
    )
}

#[test]
fn the_fixture_stores_of_every_version_read_as_they_were_written() {
    let (hub, lab) = ids();
    for version in ["v1", "v2", "v3", "v4", "v5", "v6", "v7"] {
        let (_tmp, mut core) = open_copy(&dir_of(version), "hub.redb", HUB_SECRET, "hub");
        let want = read_json(&dir_of(version).join("hub.expect.json"));
        let mut got = digest(&mut core, &[lab, hub]);
        // Status fields added since the fixture was written are not in what it recorded.
        keep_recorded(&mut got["status"], &want["status"]);
        assert_eq!(got, want, "{version}");
    }
}

/// Drop from `got` the object members `recorded` lacks, at any depth: status fields added
/// after a fixture was written (`files`, `net.file_bytes_in`, ...).
fn keep_recorded(got: &mut Json, recorded: &Json) {
    if let (Json::Object(got), Json::Object(recorded)) = (got, recorded) {
        got.retain(|k, _| recorded.contains_key(k));
        for (k, v) in got.iter_mut() {
            keep_recorded(v, &recorded[k]);
        }
    }
}

#[test]
fn frames_and_bundles_of_an_older_version_are_refused_with_their_version_named() {
    for (old, protocol, bundle) in [
        ("v1", Some(2), Some(1)),
        ("v2", Some(3), Some(2)),
        ("v3", Some(4), Some(3)),
        ("v4", Some(5), Some(3)),
        ("v5", None, Some(3)),
        ("v6", Some(6), None),
    ] {
        refused(&dir_of(old), protocol, bundle);
    }
}

/// The frames of `old` are refused as `protocol`, and its bundle as `bundle` (none: that
/// format has not changed since).
fn refused(old: &Path, protocol: Option<u16>, bundle: Option<u16>) {
    if let Some(protocol) = protocol {
        let bytes = std::fs::read(old.join("frame-00.bin")).expect("a frame");
        let err = wire::decode_exact(&bytes).expect_err("an older protocol's frame is refused");
        assert!(
            err.to_string()
                .contains(&format!("protocol version {protocol}")),
            "{err}"
        );
    }
    let Some(bundle) = bundle else {
        return;
    };
    let (_, lab) = ids();
    let tmp = tempfile::tempdir().expect("a temp dir");
    let store = Store::create(&tmp.path().join("store.redb")).expect("a store");
    let mut hub = core(HUB_SECRET, "hub", store, 5);
    hub.set_policy(lab, "lab".into(), Policy::default())
        .expect("a policy");
    let bytes = std::fs::read(old.join("lab-to-hub.bundle")).expect("the bundle");
    let err = hub
        .import_bundle(&bytes, false, &|_, _| {})
        .expect_err("an older bundle is refused");
    assert!(
        err.to_string().contains(&format!("version {bundle}")),
        "{err}"
    );
}

#[test]
fn every_fixture_frame_decodes_to_what_was_recorded_and_encodes_to_the_same_bytes() {
    let want = read_json(&dir().join("frames.expect.json"));
    let Json::Array(want) = want else {
        panic!("frames.expect.json is a list")
    };
    assert!(want.len() >= 5, "every kind of message has a fixture");
    let mut kinds = std::collections::BTreeSet::new();
    for (i, expected) in want.iter().enumerate() {
        let bytes = std::fs::read(dir().join(format!("frame-{i:02}.bin"))).expect("a frame");
        let msg = wire::decode_exact(&bytes).expect("today's code decodes the frame");
        assert_eq!(
            &serde_json::to_value(&msg).expect("JSON"),
            expected,
            "frame {i}"
        );
        assert_eq!(wire::encode(&msg).expect("encode"), bytes, "frame {i}");
        kinds.insert(kind(&msg));
    }
    assert_eq!(
        kinds.len(),
        6,
        "Hello, Changes, Rewound, Ack, Status and Ahead all have fixtures"
    );
}

#[test]
fn the_fixture_bundle_imports_as_it_did_when_written() {
    let (hub, lab) = ids();
    let tmp = tempfile::tempdir().expect("a temp dir");
    let store = Store::create(&tmp.path().join("store.redb")).expect("a store");
    let mut fresh = core(HUB_SECRET, "hub", store, 5);
    fresh
        .set_policy(lab, "lab".into(), Policy::default())
        .expect("a policy");
    let bytes = std::fs::read(dir().join("lab-to-hub.bundle")).expect("the bundle");
    let report = fresh
        .import_bundle(&bytes, false, &|_, _| {})
        .expect("today's code imports the fixture bundle");
    let want = read_json(&dir().join("bundle.expect.json"));
    let mut store = digest(&mut fresh, &[lab, hub]);
    keep_recorded(&mut store["status"], &want["store"]["status"]);
    assert_eq!(
        json!({
            "report": serde_json::to_value(report).expect("report"),
            "store": store,
        }),
        want
    );
}

fn kind(msg: &Message) -> &'static str {
    match msg {
        Message::Hello { .. } => "hello",
        Message::Changes { .. } => "changes",
        Message::Rewound { .. } => "rewound",
        Message::Ack { .. } => "ack",
        Message::Status { .. } => "status",
        Message::Ahead { .. } => "ahead",
    }
}

/// Writes the fixtures (run once, by hand; see the module's docs).
#[test]
#[ignore = "writes the committed fixtures; run by hand, once per format version"]
fn write_fixtures() {
    if std::env::var_os("TIDESYNC_WRITE_FIXTURES").is_none() {
        return;
    }
    let dir = dir();
    assert!(
        !dir.join("hub.redb").exists(),
        "fixtures exist; a format change adds a new version instead"
    );
    std::fs::create_dir_all(&dir).expect("the fixture dir");
    let (hub_id, lab_id) = ids();
    let hub_store = Store::create(&dir.join("hub.redb")).expect("the hub store");
    let lab_tmp = tempfile::tempdir().expect("a temp dir");
    let lab_store = Store::create(&lab_tmp.path().join("lab.redb")).expect("the lab store");
    let mut hub = core(HUB_SECRET, "hub", hub_store, 1);
    let mut lab = core(LAB_SECRET, "lab", lab_store, 2);
    hub.set_policy(lab_id, "lab".into(), Policy::default())
        .expect("a policy");
    // The lab sends its samples to the hub ahead of the rest of its log (protocol 7).
    let priority = Policy {
        priority: vec![names("Sample", "S-0").0],
        ..Policy::default()
    };
    lab.set_policy(hub_id, "hub".into(), priority)
        .expect("a policy");

    // Each side writes, both create the same name (a collision), one object is deleted.
    for i in 0..6 {
        put(
            &mut lab,
            "Sample",
            &format!("S-{i}"),
            json!({"status": "received", "mass_mg": i * 10, "tags": ["a", "b"], "note": null}),
        );
    }
    put(&mut lab, "Sample", "S-1", json!({"status": "analysed"}));
    let (ty, id) = names("Sample", "S-2");
    lab.delete(&ty, &id).expect("a delete");
    put(
        &mut hub,
        "Method",
        "M-1",
        json!({"title": "Karl Fischer", "version": 3}),
    );
    put(
        &mut hub,
        "Sample",
        "S-0",
        json!({"status": "hub's own S-0"}),
    );
    let mut frames: Vec<Message> = Vec::new();
    settle(&mut [&mut hub, &mut lab], |m| frames.push(m.clone()));
    // Concurrent edits of one field, then a second sync.
    put(&mut hub, "Sample", "S-3", json!({"status": "hub says"}));
    put(&mut lab, "Sample", "S-3", json!({"status": "lab says"}));
    settle(&mut [&mut hub, &mut lab], |m| frames.push(m.clone()));
    // A change whose dependency the hub lacks: held.
    put(&mut lab, "Sample", "S-4", json!({"status": "step 1"}));
    put(&mut lab, "Sample", "S-4", json!({"status": "step 2"}));
    let last = lab.last_seq().expect("lab's log");
    let log = lab.store().log_since(last - 1, 1).expect("lab's log");
    let (seq, entry) = log.into_iter().next().expect("the last entry");
    let signed = lab
        .store()
        .change(&entry.doc, &automerge::ChangeHash(entry.hash))
        .expect("a read")
        .expect("the change");
    let record = lab
        .store()
        .record(&entry.doc)
        .expect("a read")
        .expect("a record");
    let held = Message::Changes {
        batch: 1_000,
        after: seq - 1,
        docs: vec![wire::DocHeader {
            doc: entry.doc,
            origin: record.origin,
            ty: record.ty,
            id: record.id,
        }],
        changes: vec![signed],
        upto: Checkpoint {
            seq,
            hash: entry.hash,
        },
        tip: seq,
    };
    hub.on_connected(lab_id).expect("connect");
    let ack = hub.on_request(lab_id, held.clone(), None).expect("held");
    frames.push(held);
    frames.push(ack);
    frames.push(Message::Rewound {
        resume: Checkpoint {
            seq: 3,
            hash: [9; 32],
        },
    });
    assert!(
        hub.store().pending_count().expect("held") > 0,
        "one change is held"
    );
    // The lab's signed status record (protocol 5), and the hub's answer.
    let status = lab.status(&[]).expect("the lab's status");
    let record = lab.status_record(&status, CLOCK_MS);
    let signed = lab.sign_status(&record).expect("a signed record");
    let status = Message::Status { status: signed };
    let ack = hub
        .on_request(lab_id, status.clone(), None)
        .expect("a status");
    frames.push(status);
    frames.push(ack);

    // A file the lab stores and refers to after the frames (bundle 4 carries it).
    let report = b"a result report, as a SENAITE lab attaches to a sample";
    let (hash, size) = lab
        .store()
        .add_file(&mut &report[..], CLOCK_MS)
        .expect("a file");
    put(
        &mut lab,
        "Sample",
        "S-9",
        json!({"report": {"$file": hash.to_string(), "size": size, "name": "report.txt"}}),
    );

    // The bundle: everything the lab lets out to the hub, with the file.
    let (bundle, _) = lab
        .export_bundle("hub", true, true, true, &|_| {})
        .expect("a bundle");
    std::fs::write(dir.join("lab-to-hub.bundle"), &bundle).expect("writing the bundle");
    let tmp = tempfile::tempdir().expect("a temp dir");
    let mut fresh = core(
        HUB_SECRET,
        "hub",
        Store::create(&tmp.path().join("store.redb")).expect("a store"),
        5,
    );
    fresh
        .set_policy(lab_id, "lab".into(), Policy::default())
        .expect("a policy");
    let report = fresh
        .import_bundle(&bundle, false, &|_, _| {})
        .expect("the bundle imports");
    write_json(
        &dir.join("bundle.expect.json"),
        &json!({
            "report": serde_json::to_value(report).expect("report"),
            "store": digest(&mut fresh, &[lab_id, hub_id]),
        }),
    );

    // The frames, as bytes and as JSON.
    let mut expect = Vec::new();
    for (i, m) in frames.iter().enumerate() {
        std::fs::write(
            dir.join(format!("frame-{i:02}.bin")),
            wire::encode(m).expect("encode"),
        )
        .expect("writing a frame");
        expect.push(serde_json::to_value(m).expect("JSON"));
    }
    write_json(&dir.join("frames.expect.json"), &Json::Array(expect));

    // The hub's store, read back through a fresh core over a copy (as the test will).
    drop(hub);
    let (_tmp, mut reread) = open_copy(&dir, "hub.redb", HUB_SECRET, "hub");
    write_json(
        &dir.join("hub.expect.json"),
        &digest(&mut reread, &[lab_id, hub_id]),
    );
}
