//! Attacks by a configured peer through the bundles it signs: changes crafted to panic, spin
//! or inflate Automerge, a flood of held changes, and a chain sent in reverse. After each, the
//! victim still answers its API, keeps syncing with an honest peer, and has lost nothing.

use std::path::PathBuf;

use automerge::{Automerge, ROOT, transaction::Transactable};
use serde_json::json;
use tidesync::bundle::{BundleBody, seal};
use tidesync::identity::Identity;
use tidesync_proto::craft;
use tidesync_proto::ids::actor_id;
use tidesync_proto::{Checkpoint, DocHeader, DocId, NodeId, ObjectId, SignedChange, TypeName};
use tidesync_tests::TestNode;
use tidesync_tests::mallory::{assert_still_healthy, hub_lab_and_mallory};

struct Mallory {
    identity: Identity,
    victim: NodeId,
    dir: tempfile::TempDir,
    n: usize,
}

impl Mallory {
    fn new(mallory: &TestNode, victim: &TestNode) -> Mallory {
        Mallory {
            identity: Identity::load(&mallory.home().join("identity.key")).expect("mallory's key"),
            victim: victim.id().parse().expect("victim id"),
            dir: tempfile::tempdir().expect("temporary directory"),
            n: 0,
        }
    }

    fn me(&self) -> NodeId {
        self.identity.node_id()
    }

    fn header(&self, id: &str) -> DocHeader {
        let ty = TypeName::new("Sample").expect("type");
        let id = ObjectId::new(id).expect("id");
        DocHeader {
            doc: DocId::derive(&self.me(), &ty, &id),
            origin: self.me(),
            ty,
            id,
        }
    }

    /// A bundle signed by mallory, to the victim, carrying `changes`.
    fn bundle(&mut self, docs: Vec<DocHeader>, changes: Vec<SignedChange>) -> String {
        let body = BundleBody {
            from: self.me(),
            to: self.victim,
            created_ms: 0,
            after: 0,
            upto: Checkpoint::default(),
            holds: Checkpoint::default(),
            docs,
            changes,
            files: Vec::new(),
            wants: Vec::new(),
        };
        let bytes = seal(&self.identity, &body, true).expect("sealing a bundle");
        self.n += 1;
        let path: PathBuf = self.dir.path().join(format!("attack-{}.bundle", self.n));
        std::fs::write(&path, bytes).expect("writing a bundle");
        path.display().to_string()
    }

    /// One hand-made change to mallory's document `id`, with `columns`.
    fn crafted(&self, id: &str, deps: &[[u8; 32]], columns: &[(u32, Vec<u8>)]) -> SignedChange {
        let bytes = craft::chunk(&actor_id(&self.me(), 7), deps, columns, false);
        craft::sign(self.identity.signing_key(), self.header(id).doc, bytes)
    }
}

/// The hub still answers, still syncs with the honest lab, and kept what it had.

// Regression: one change of about 100 bytes whose op names a counter of 2^32 made Automerge
// 0.12 panic on the node's actor (the process then answered 503 for ever); one whose action
// column claims 2^62 ops made decode loop for ever; compressed chunks inflated without limit.
// Each now gets a clear refusal, from `import --dry-run` and a real import alike.
#[test]
fn crafted_changes_are_refused_and_the_node_keeps_running() {
    let (hub, lab, mallory) = hub_lab_and_mallory(&[]);
    let mut m = Mallory::new(&mallory, &hub);
    let attacks = [
        ("panic", craft::counter_bomb()),
        ("spin", craft::op_count_bomb()),
        ("nulls", craft::null_run_bomb()),
    ];
    for (name, columns) in attacks {
        let change = m.crafted(&format!("S-{name}"), &[], &columns);
        let file = m.bundle(vec![m.header(&format!("S-{name}"))], vec![change]);
        let dry = json_of(&hub.ok(&["import", "--dry-run", "--json", &file]));
        assert_eq!(dry["rejected"], json!(1), "{name}: {dry}");
        let real = json_of(&hub.ok(&["import", "--json", &file]));
        assert_eq!(real["rejected"], json!(1), "{name}: {real}");
        assert_eq!(real["new_changes"], json!(0), "{name}: {real}");
        assert_still_healthy(&hub, &lab, name);
    }
    // A compressed chunk is refused whole, whatever it would inflate to.
    let bytes = craft::chunk(&actor_id(&m.me(), 7), &[], &[], true);
    let change = craft::sign(m.identity.signing_key(), m.header("S-zip").doc, bytes);
    let file = m.bundle(vec![m.header("S-zip")], vec![change]);
    let real = json_of(&hub.ok(&["import", "--json", &file]));
    assert_eq!(real["rejected"], json!(1), "{real}");
    assert_still_healthy(&hub, &lab, "zip");
}

// Regression: held changes had no quota (20,000 with invented dependencies grew a store from
// 73 KB to 17.8 MB, for good), and a chain that arrived in reverse was released in quadratic
// time on the actor. Held changes are now bounded per peer and released in dependency order.
#[test]
fn a_flood_of_held_changes_is_bounded_and_a_reversed_chain_is_released() {
    let (hub, lab, mallory) = hub_lab_and_mallory(&[]);
    let mut m = Mallory::new(&mallory, &hub);
    // A chain of 12,001 edits by mallory, sent without its first change: every one waits for
    // a dependency. The document may hold 4,000 (`MAX_HELD_CHANGES_PER_DOC`); the rest are
    // refused for lack of room, not lost.
    let flood_header = m.header("S-flood");
    let flood = chain(&m, &flood_header, 12_001);
    let file = m.bundle(vec![flood_header.clone()], flood[1..].to_vec());
    let _ = hub.ok(&["import", "--json", &file]);
    assert_eq!(hub.status()["held_changes"], json!(4_000));
    let tallies = json_of(&hub.ok(&["held", "--peer", "mallory", "--json"]));
    assert_eq!(tallies["tallies"][0]["changes"], json!(4_000), "{tallies}");
    assert_eq!(
        tallies["tallies"][0]["refused_for_room"],
        json!(8_000),
        "{tallies}"
    );
    let peer = hub.peer("mallory");
    assert_eq!(peer["held"], json!(4_000), "{peer}");
    assert_eq!(peer["held_refused_for_room"], json!(8_000), "{peer}");
    assert_still_healthy(&hub, &lab, "flood");
    // The first change arrives: the 4,000 held are released in order; the same bundle again
    // (the refused ones arrive again) completes the document.
    let first = m.bundle(vec![flood_header.clone()], flood[..1].to_vec());
    let _ = hub.ok(&["import", "--json", &first]);
    assert_eq!(hub.status()["held_changes"], json!(0));
    let _ = hub.ok(&["import", "--json", &file]);
    assert_eq!(hub.get("Sample", "S-flood"), Some(json!({"n": 12_000})));
    // A purge removes what is held, by peer.
    let more = chain(&m, &m.header("S-purge"), 11);
    let file = m.bundle(vec![m.header("S-purge")], more[1..].to_vec());
    let _ = hub.ok(&["import", "--json", &file]);
    assert_eq!(hub.status()["held_changes"], json!(10));
    let purged = hub.ok(&["held", "purge", "--peer", "mallory"]);
    assert!(purged.contains("removed 10"), "{purged}");
    assert_eq!(hub.status()["held_changes"], json!(0));

    // A real chain of 3,000 edits by mallory, sent newest first: all of it applies.
    let header = m.header("S-chain");
    let mut edits = chain(&m, &header, 3_000);
    edits.reverse();
    let file = m.bundle(vec![header], edits);
    let _ = hub.ok(&["import", "--json", &file]);
    assert_eq!(hub.get("Sample", "S-chain"), Some(json!({"n": 2_999})));
    assert_eq!(hub.status()["held_changes"], json!(0));
    assert_still_healthy(&hub, &lab, "chain");
}

/// `n` edits by mallory of its document `header`, each setting `n` to its index, signed.
fn chain(m: &Mallory, header: &DocHeader, n: i64) -> Vec<SignedChange> {
    let mut doc = Automerge::new().with_actor(actor_id(&m.me(), 9).into());
    (0..n)
        .map(|i| {
            let mut tx = doc.transaction();
            tx.put(ROOT, "n", i).expect("put");
            tx.commit();
            let change = doc.get_last_local_change().expect("a change");
            SignedChange::sign(m.identity.signing_key(), header.doc, &change)
        })
        .collect()
}

fn json_of(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}
