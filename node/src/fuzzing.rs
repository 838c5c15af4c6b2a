//! Fuzz targets: one function per hostile input, each feeding arbitrary bytes through the real
//! decode, verify, import and apply paths; none may panic on any input (`fuzz/` drives them).
//!
//! Each function takes the fuzzer's bytes and returns nothing: the property is that it returns
//! at all, and the few `assert!`s state what must hold for every input (a decoded frame
//! re-encodes to the same message, a change we make ourselves verifies, a saved config loads
//! again). The same functions replay the committed corpora on stable (`node/tests/fuzz_corpora.rs`).
//!
//! Signatures stand between the fuzzer and most of the code, so the harnesses sign what they
//! are given with a fixed test key, and fix up a change chunk's checksum (the first four bytes
//! of its SHA-256 hash) before signing: mutated changes then reach the op checks and Automerge
//! instead of dying at the checksum or the signature. Every target also feeds the raw bytes,
//! unsigned and unfixed, to the same entry points a peer reaches.

use std::cell::RefCell;

use automerge::{Automerge, ChangeHash, ReadDoc};
use ed25519_dalek::Signer;
use serde_json::{Map, Value as Json, json};
use sha2::{Digest, Sha256};
use tidesync_proto::change::signing_message;
use tidesync_proto::chunk::ChangeHeader;
use tidesync_proto::{DocHeader, DocId, NodeId, ObjectId, SignedChange, TypeName, wire};

use crate::bundle::{self, BundleBody};
use crate::config::Config;
use crate::core::Core;
use crate::identity::Identity;
use crate::model::DocRecord;
use crate::replica::engine::{Arrival, Arrived, Engine, Loaded, WriteOp, WriteOutcome};
use crate::store::Store;

/// A fuzz target's function.
pub type Target = fn(&[u8]);

/// Every target: its name (the `fuzz/fuzz_targets/<name>.rs` and corpus folder) and function.
pub const TARGETS: &[(&str, Target)] = &[
    ("change_decode", change_decode),
    ("wire_decode", wire_decode),
    ("bundle_open", bundle_open),
    ("engine_receive", engine_receive),
    ("json_doc", json_doc),
    ("config_parse", config_parse),
];

/// The secret of the test key that authors and exports: "ship".
pub const SHIP_SECRET: [u8; 32] = [1; 32];
/// The secret of the test key that receives and imports: "hub".
pub const HUB_SECRET: [u8; 32] = [2; 32];
/// The epoch of the ship's Automerge actor in every harness, so inputs replay exactly.
pub const SHIP_EPOCH: u64 = 1;
/// The document id the change-decode harness signs for.
pub const FUZZ_DOC: DocId = DocId([7; 16]);
/// Clock of every local write in the harnesses, Unix milliseconds.
const NOW_MS: i64 = 1_780_000_000_000;
/// The Automerge chunk magic bytes: the separator of several changes in one input.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// The fixed test identities and the small document every harness starts from.
pub struct Fixture {
    pub ship: Identity,
    pub hub: Identity,
    pub engine: Engine,
    pub doc_id: DocId,
    pub header: DocHeader,
    pub record: DocRecord,
    pub doc: Automerge,
    /// The signed change that created `doc`.
    pub genesis: SignedChange,
}

impl Fixture {
    fn build() -> Option<Fixture> {
        let ship = Identity::from_secret(SHIP_SECRET);
        let hub = Identity::from_secret(HUB_SECRET);
        let ship_id = ship.node_id();
        let engine = Engine::new(Identity::from_secret(SHIP_SECRET), SHIP_EPOCH);
        let ty = TypeName::new("Sample").ok()?;
        let id = ObjectId::new("s-1").ok()?;
        let fields = json!({"depth": 120, "name": "core", "tags": ["a", "b"], "pos": {"lat": 1.5}});
        // The genesis is written one operation at a time, as the engine wrote new documents
        // before it batched them (same actor, message and time): the committed regression
        // inputs and corpora build on this change's hash.
        let doc_id = DocId::derive(&ship_id, &ty, &id);
        let mut doc =
            Automerge::new().with_actor(tidesync_proto::ids::actor_id(&ship_id, SHIP_EPOCH).into());
        let mut tx = doc.transaction();
        crate::doc::put_fields(&mut tx, fields.as_object()?).ok()?;
        let (hash, _) = tx.commit_with(
            automerge::transaction::CommitOptions::default()
                .with_message("create")
                .with_time(NOW_MS.div_euclid(1000)),
        );
        let genesis =
            SignedChange::sign(ship.signing_key(), doc_id, &doc.get_change_by_hash(&hash?)?);
        Some(Fixture {
            header: DocHeader {
                doc: doc_id,
                origin: ship_id,
                ty: ty.clone(),
                id: id.clone(),
            },
            ship,
            hub,
            engine,
            doc_id,
            record: DocRecord {
                origin: ship_id,
                ty,
                local_id: id.clone(),
                id,
                live: true,
            },
            doc,
            genesis,
        })
    }

    /// Run `f` with this thread's fixture (built once per thread).
    pub fn with<R>(f: impl FnOnce(&Fixture) -> R) -> Option<R> {
        thread_local! {
            static FIXTURE: RefCell<Option<std::rc::Rc<Fixture>>> = const { RefCell::new(None) };
        }
        let fixture = FIXTURE.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Fixture::build().map(std::rc::Rc::new);
            }
            slot.clone()
        })?;
        Some(f(&fixture))
    }

    /// The fixture's document as the engine and the store take it.
    pub fn loaded(&self) -> Loaded {
        Loaded {
            doc_id: self.doc_id,
            record: self.record.clone(),
            doc: self.doc.clone(),
        }
    }
}

/// `bytes` with the checksum of a change chunk (bytes 4..8) set to the first four bytes of the
/// SHA-256 of everything after it, which is the chunk's hash when its length is canonical.
pub fn fix_checksum(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.len() > 8 && out[..4] == CHUNK_MAGIC {
        let hash = Sha256::digest(&out[8..]);
        out[4..8].copy_from_slice(&hash[..4]);
    }
    out
}

/// Change bytes signed by `key` for `doc`, as their author would (a zero hash when the header
/// does not parse: such a change fails verification anyway).
pub fn sign_bytes(key: &Identity, doc: DocId, bytes: Vec<u8>) -> SignedChange {
    let hash = ChangeHeader::parse(&bytes)
        .map(|h| h.hash)
        .unwrap_or_default();
    let signature = key
        .signing_key()
        .sign(&signing_message(&doc, &ChangeHash(hash)))
        .to_bytes();
    SignedChange {
        doc,
        bytes,
        signature,
    }
}

/// Split `data` into change chunks at each Automerge magic (so one input can carry a chain).
fn split_changes(data: &[u8]) -> Vec<&[u8]> {
    let mut starts: Vec<usize> = data
        .windows(CHUNK_MAGIC.len())
        .enumerate()
        .filter(|(_, w)| *w == CHUNK_MAGIC)
        .map(|(i, _)| i)
        .collect();
    if starts.first() != Some(&0) {
        starts.insert(0, 0);
    }
    starts
        .iter()
        .enumerate()
        .map(|(n, &s)| &data[s..starts.get(n + 1).copied().unwrap_or(data.len())])
        .collect()
}

/// Change decode plus verify: `data` as a postcard `SignedChange` (as it arrives), and as raw
/// change bytes through the bounded reader, `parse_change`, and, checksum fixed and signed by
/// the ship, full verification down to Automerge's decoder.
pub fn change_decode(data: &[u8]) {
    if let Ok(signed) = postcard::from_bytes::<SignedChange>(data) {
        let _ = signed.verify();
    }
    if let Ok(header) = ChangeHeader::parse(data) {
        let _ = header.check_ops(data);
    }
    let _ = tidesync_proto::parse_change(data.to_vec());
    let fixed = fix_checksum(data);
    let ship = Identity::from_secret(SHIP_SECRET);
    let signed = sign_bytes(&ship, FUZZ_DOC, fixed.clone());
    let verified = signed.verify();
    let parsed = tidesync_proto::parse_change(fixed);
    if let Ok(v) = verified {
        // What verifies must also parse, to the same change.
        assert_eq!(
            parsed.as_ref().map(|c| c.hash()).ok(),
            Some(v.hash),
            "a verified change does not parse alike"
        );
    }
}

/// The wire codec: `data` as a whole frame and as a frame body. A decoded message re-encodes
/// and decodes to itself, and every change it carries goes through verification.
pub fn wire_decode(data: &[u8]) {
    let _ = wire::decode(data);
    let Ok(msg) = wire::decode_body(data) else {
        return;
    };
    let frame = wire::encode(&msg);
    assert!(
        frame.is_ok(),
        "a decoded message does not re-encode: {frame:?}"
    );
    if let Ok(frame) = frame {
        assert_eq!(
            wire::decode_exact(&frame).ok().as_ref(),
            Some(&msg),
            "a message does not survive a round trip"
        );
    }
    if let tidesync_proto::Message::Changes { changes, docs, .. } = &msg {
        // As `sync::verify_batch` does, on one thread: decode, one key per author, batch.
        let decoded: Vec<_> = changes.iter().map(SignedChange::decode).collect();
        let mut keys = std::collections::HashMap::new();
        for d in decoded.iter().flatten() {
            keys.entry(d.author)
                .or_insert_with(|| tidesync_proto::AuthorKey::new(&d.author));
        }
        let _ = tidesync_proto::check_batch(decoded, &keys);
        for h in docs {
            let _ = DocId::derive(&h.origin, &h.ty, &h.id) == h.doc;
        }
    }
}

/// A bundle from `from` to `to` whose body is exactly `body` (listing no files), signed by
/// `from` and (when `encrypt`) encrypted to `to`, through the writer `bundle::seal` uses.
pub fn seal_raw(from: &Identity, to: &NodeId, body: &[u8], encrypt: bool) -> Option<Vec<u8>> {
    bundle::stream::write_encoded(from, to, body, encrypt, &[], Vec::new(), &mut |_, _| Ok(())).ok()
}

/// A hub over a fresh in-memory store that takes everything from the ship.
fn hub_core(f: &Fixture) -> Option<Core> {
    let store = Store::in_memory().ok()?;
    let mut hub = Core::new(
        "hub".into(),
        Identity::from_secret(HUB_SECRET),
        store,
        64,
        true,
    );
    hub.set_policy(f.ship.node_id(), "ship".into(), Default::default())
        .ok()?;
    Some(hub)
}

/// Bundle body parsing: `data` is the body (a postcard `BundleBody`), sealed and encrypted by
/// the ship to the hub, then imported by a fresh hub, first as a dry run and then for real.
/// When the body decodes, its changes are also re-signed by the ship (checksums fixed) and the
/// bundle sealed again by `bundle::seal`, so the import reaches the store.
pub fn bundle_open(data: &[u8]) {
    Fixture::with(|f| {
        let to = f.hub.node_id();
        let Some(sealed) = seal_raw(&f.ship, &to, data, true) else {
            return;
        };
        if let Some(mut hub) = hub_core(f) {
            let _ = hub.import_bundle(&sealed, true, &|_, _| {});
            let _ = hub.import_bundle(&sealed, false, &|_, _| {});
        }
        let Ok(mut body) = postcard::from_bytes::<BundleBody>(data) else {
            return;
        };
        for c in &mut body.changes {
            *c = sign_bytes(&f.ship, c.doc, fix_checksum(&c.bytes));
        }
        let Ok(resealed) = bundle::seal(&f.ship, &body, false) else {
            return;
        };
        if let Some(mut hub) = hub_core(f) {
            let _ = hub.import_bundle(&resealed, false, &|_, _| {});
            // A second import of the same bundle finds nothing new.
            let _ = hub.import_bundle(&resealed, false, &|_, _| {});
        }
    });
}

/// `Engine::receive` against a small document: `data` is one or more change chunks (split at
/// each chunk magic), checksums fixed, signed by the ship, verified, and received by the
/// fixture's document and by a node that does not have it yet.
pub fn engine_receive(data: &[u8]) {
    let _ = receive_outcomes(data);
}

/// What [`engine_receive`] decides for `data`: one outcome per receive (none when no change
/// of `data` verifies).
pub fn receive_outcomes(data: &[u8]) -> Vec<Arrived> {
    Fixture::with(|f| {
        let incoming: Vec<_> = split_changes(data)
            .into_iter()
            .filter_map(|bytes| {
                let signed = sign_bytes(&f.ship, f.doc_id, fix_checksum(bytes));
                signed.verify().ok().map(|v| (signed, v))
            })
            .collect();
        if incoming.is_empty() {
            return Vec::new();
        }
        let mut outcomes = Vec::new();
        for existing in [Some((f.record.clone(), f.doc.clone())), None] {
            let arrival = Arrival {
                header: f.header.clone(),
                from: f.hub.node_id(),
                existing,
                held: Vec::new(),
                incoming: incoming.clone(),
                name: f.header.id.clone(),
                name_taken: false,
                one_by_one: false,
                bans: Default::default(),
            };
            let arrived = f.engine.receive(arrival);
            if let Some(doc) = &arrived.doc {
                let _ = crate::doc::to_json(doc);
            }
            outcomes.push(arrived);
        }
        // The same changes held from an earlier batch, released by receiving nothing new.
        let arrival = Arrival {
            header: f.header.clone(),
            from: f.hub.node_id(),
            existing: Some((f.record.clone(), f.doc.clone())),
            held: incoming
                .iter()
                .map(|(s, _)| (s.clone(), Some(f.hub.node_id())))
                .collect(),
            incoming: Vec::new(),
            name: f.header.id.clone(),
            name_taken: true,
            one_by_one: false,
            bans: Default::default(),
        };
        outcomes.push(f.engine.receive(arrival));
        outcomes
    })
    .unwrap_or_default()
}

/// JSON to document: `data` as a PUT body (`api::parse_fields`), written by the engine onto the
/// fixture's document and onto a new one. A change we make ourselves must verify.
pub fn json_doc(data: &[u8]) {
    if data.len() > crate::api::MAX_OBJECT_BYTES {
        return;
    }
    let Ok(fields) = crate::api::parse_fields(data) else {
        return;
    };
    Fixture::with(|f| {
        for existing in [Some(f.loaded()), None] {
            let written = f.engine.local_write(
                NOW_MS,
                &f.header.ty,
                &f.header.id,
                existing,
                WriteOp::Put(&fields),
            );
            if let Ok(WriteOutcome::Changed(p)) = written {
                let _: Map<String, Json> = crate::doc::to_json(&p.doc);
                let verified = p.change.verify();
                assert!(
                    verified.is_ok(),
                    "our own change does not verify: {verified:?}"
                );
            }
        }
    });
}

/// Config parsing: `data` as the text of `config.toml`, parsed and validated as
/// `Config::load` does. A valid config, saved as `Config::save` writes it, loads back equal.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = toml::from_str::<Config>(text) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let saved = toml::to_string_pretty(&config);
    assert!(saved.is_ok(), "a valid config does not save: {saved:?}");
    if let Ok(saved) = saved {
        let again = toml::from_str::<Config>(&saved);
        assert_eq!(
            again.as_ref().ok(),
            Some(&config),
            "a saved config does not load back: {again:?}\n{saved}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_raw_bodies_matches_seal() {
        Fixture::with(|f| {
            let body = BundleBody {
                from: f.ship.node_id(),
                to: f.hub.node_id(),
                created_ms: NOW_MS,
                after: 0,
                upto: Default::default(),
                holds: Default::default(),
                docs: vec![f.header.clone()],
                changes: vec![f.genesis.clone()],
                files: Vec::new(),
                wants: Vec::new(),
            };
            let encoded = postcard::to_stdvec(&body).unwrap();
            let ours = seal_raw(&f.ship, &f.hub.node_id(), &encoded, false).unwrap();
            assert_eq!(ours, bundle::seal(&f.ship, &body, false).unwrap());
            let mut hub = hub_core(f).unwrap();
            let sealed = seal_raw(&f.ship, &f.hub.node_id(), &encoded, true).unwrap();
            let report = hub.import_bundle(&sealed, false, &|_, _| {}).unwrap();
            assert_eq!((report.added, report.new_changes), (1, 1));
        })
        .unwrap();
    }

    #[test]
    fn automerge_panic_in_import_ops_is_caught_and_the_change_refused() {
        // Regression (found by the engine_receive and bundle_open fuzzers): Automerge 0.12.0
        // panics (`op_set2/change/batch.rs:1121`, `unwrap` on `None` in `import_ops`) applying
        // this signed change, which our bounded reader accepts: the actor (same key, another
        // epoch) is new to the document and its seq is 2. Engine::receive's
        // `catch_unwind` must turn the panic into a poisoned arrival, never a dead thread.
        let data =
            include_bytes!("../../fuzz/regressions/engine_receive/automerge-import-ops-unwrap");
        let outcomes = receive_outcomes(data);
        assert!(
            outcomes.iter().any(|a| a.poisoned.is_some()),
            "the input no longer reaches the Automerge panic: {outcomes:?}"
        );
        // Through a whole node: a bundle carrying it is imported without a panic escaping.
        bundle_open(include_bytes!(
            "../../fuzz/regressions/bundle_open/automerge-import-ops-unwrap"
        ));
    }

    #[test]
    fn the_harnesses_reach_past_the_signature() {
        Fixture::with(|f| {
            // A valid change with a broken checksum verifies once fixed and signed.
            let mut bytes = f.genesis.bytes.clone();
            bytes[4] ^= 0xff;
            assert!(
                SignedChange {
                    bytes: bytes.clone(),
                    ..f.genesis.clone()
                }
                .verify()
                .is_err()
            );
            let fixed = sign_bytes(&f.ship, f.doc_id, fix_checksum(&bytes));
            assert!(fixed.verify().is_ok());
        })
        .unwrap();
    }
}

/// Writes the seed corpora: `cargo test --workspace --lib -- --ignored write_seed_corpora`.
#[cfg(test)]
mod seeds {
    use super::*;
    use std::path::PathBuf;
    use tidesync_proto::{Checkpoint, Message};

    fn write(target: &str, name: &str, bytes: &[u8]) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    /// Changes by the ship on the fixture's document: a put, then a delete on top of it.
    fn later_changes(f: &Fixture) -> (SignedChange, SignedChange) {
        let fields = json!({"depth": 121, "tags": null, "note": "x"});
        let WriteOutcome::Changed(p) = f
            .engine
            .local_write(
                NOW_MS + 1000,
                &f.header.ty,
                &f.header.id,
                Some(f.loaded()),
                WriteOp::Put(fields.as_object().unwrap()),
            )
            .unwrap()
        else {
            panic!("no change")
        };
        let put = p.change.clone();
        let loaded = Loaded {
            doc_id: p.doc_id,
            record: p.record,
            doc: p.doc,
        };
        let WriteOutcome::Changed(d) = f
            .engine
            .local_write(
                NOW_MS + 2000,
                &f.header.ty,
                &f.header.id,
                Some(loaded),
                WriteOp::Delete,
            )
            .unwrap()
        else {
            panic!("no change")
        };
        (put, d.change)
    }

    #[test]
    #[ignore = "writes fuzz/corpus; run by hand"]
    fn write_seed_corpora() {
        Fixture::with(|f| {
            let (put, del) = later_changes(f);
            let g = &f.genesis;
            write("change_decode", "genesis", &g.bytes);
            write("change_decode", "put", &put.bytes);
            write("change_decode", "delete", &del.bytes);
            write("change_decode", "signed-genesis", &postcard::to_stdvec(g).unwrap());

            write("engine_receive", "put", &put.bytes);
            write("engine_receive", "genesis", &g.bytes);
            write("engine_receive", "put-delete", &[put.bytes.clone(), del.bytes.clone()].concat());
            write("engine_receive", "delete-put", &[del.bytes.clone(), put.bytes.clone()].concat());

            let msgs = [
                ("hello", Message::Hello {
                    number: 1,
                    node: f.ship.node_id(),
                    name: "ship".into(),
                    resume: Checkpoint { seq: 3, hash: [9; 32] },
                    tip: 7,
                }),
                ("changes", Message::Changes {
                    batch: 2,
                    after: 0,
                    docs: vec![f.header.clone()],
                    changes: vec![g.clone(), put.clone()],
                    upto: Checkpoint { seq: 2, hash: [5; 32] },
                    tip: 2,
                }),
                ("rewound", Message::Rewound { resume: Checkpoint { seq: 1, hash: [1; 32] } }),
                ("ack", Message::Ack { batch: 2, upto: 2, rejected: 1 }),
            ];
            for (name, msg) in msgs {
                let frame = wire::encode(&msg).unwrap();
                write("wire_decode", &format!("{name}-frame"), &frame);
                write("wire_decode", &format!("{name}-body"), &frame[wire::FRAME_HEADER_BYTES..]);
            }

            let body = |changes: Vec<SignedChange>| BundleBody {
                from: f.ship.node_id(),
                to: f.hub.node_id(),
                created_ms: NOW_MS,
                after: 0,
                upto: Checkpoint { seq: changes.len() as u64, hash: [3; 32] },
                holds: Checkpoint::default(),
                docs: vec![f.header.clone()],
                changes,
                files: Vec::new(),
                wants: Vec::new(),
            };
            let enc = |b: &BundleBody| postcard::to_stdvec(b).unwrap();
            write("bundle_open", "empty", &enc(&body(vec![])));
            write("bundle_open", "one", &enc(&body(vec![g.clone()])));
            write("bundle_open", "three", &enc(&body(vec![g.clone(), put.clone(), del.clone()])));
            write("bundle_open", "reversed", &enc(&body(vec![del.clone(), put.clone(), g.clone()])));

            write("json_doc", "flat", br#"{"depth": 120, "name": "core", "ok": true, "v": -1.5e3}"#);
            write("json_doc", "nested", br#"{"pos": {"lat": 1.5, "lon": [1, 2, {"x": null}]}, "tags": ["a"]}"#);
            write("json_doc", "remove", br#"{"depth": null, "name": "\u00e9\ud83d\ude00"}"#);
            write("json_doc", "big", br#"{"n": 18446744073709551615, "m": -9223372036854775808, "s": ""}"#);
            write("json_doc", "reserved", br#"{"@deleted": true}"#);

            let id = f.hub.node_id().to_peer_id().unwrap().to_string();
            write("config_parse", "minimal", b"name = \"ship\"\nlisten = [\"/ip4/127.0.0.1/tcp/4001\"]\n\n[api]\nlisten = \"127.0.0.1:8080\"\n");
            write(
                "config_parse",
                "full",
                format!(
                    "name = \"ship\"\nlisten = [\"/ip4/127.0.0.1/tcp/4001\", \"/ip6/::1/tcp/4002\"]\n\n[api]\nlisten = \"0.0.0.0:8080\"\ntoken = \"s3cret\"\n\n[store]\ncache_docs = 10\ncache_bytes = 1048576\n\n[[peers]]\nname = \"hub\"\nid = \"{id}\"\naddrs = [\"/ip4/127.0.0.1/tcp/4003\"]\n"
                )
                .as_bytes(),
            );
            write(
                "config_parse",
                "policies",
                format!(
                    "name = \"hub\"\nlisten = []\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n[[peers]]\nname = \"archive\"\nid = \"{id}\"\ntypes = [\"Volume\", \"LabelTree\"]\nread-only = [\"Method\"]\nskip = [\"Secret\"]\nprefix = \"ar-\"\nprefixed = [\"Volume\"]\n\n[peers.refs]\nVolume = [\"label_trees:LabelTree\", \"owner:User\"]\nLabelTree = [\"members:User\"]\n"
                )
                .as_bytes(),
            );
        })
        .unwrap();
    }
}
