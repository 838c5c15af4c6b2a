//! A configured peer turned hostile, over a real libp2p connection to a real node process:
//! crafted changes, bogus Hellos, thousands of type names and many streams at once. After each
//! attack the victim still answers its API, keeps syncing with an honest peer, and has lost
//! nothing it acknowledged.

use tidesync_proto::craft;
use tidesync_proto::ids::actor_id;
use tidesync_proto::{Checkpoint, DocHeader, DocId, Message, ObjectId, SignedChange, TypeName};
use tidesync_tests::mallory::{Answer, Mallory, assert_still_healthy, hub_lab_and_mallory_on};

fn header(m: &Mallory, ty: &str, id: &str) -> DocHeader {
    let ty = TypeName::new(ty).expect("type");
    let id = ObjectId::new(id).expect("id");
    DocHeader {
        doc: DocId::derive(&m.me(), &ty, &id),
        origin: m.me(),
        ty,
        id,
    }
}

fn crafted(m: &Mallory, h: &DocHeader, columns: &[(u32, Vec<u8>)]) -> SignedChange {
    let bytes = craft::chunk(&actor_id(&m.me(), 7), &[], columns, false);
    craft::sign(m.identity.signing_key(), h.doc, bytes)
}

fn batch(n: u64, docs: Vec<DocHeader>, changes: Vec<SignedChange>) -> Message {
    Message::Changes {
        batch: n,
        after: 0,
        docs,
        changes,
        upto: Checkpoint::default(),
        tip: 0,
    }
}

// Regression: a peer's change naming a counter of 2^32 panicked Automerge on the node's actor
// (503 for ever after), one claiming 2^62 ops made decode spin, the peer could hold 100 streams
// of 8 MiB on one connection, repeated bogus Hellos made the node rescan its log each time,
// and 20,000 type names grew a 1.26 MB status. Each is now refused or bounded.
#[test]
fn a_hostile_configured_peer_cannot_crash_stall_or_bloat_the_node() {
    hostile_peer(&[], "/tcp/");
}

// The same attacks over QUIC, whose streams and flow control are its own, not Yamux's.
#[test]
fn a_hostile_configured_peer_over_quic_cannot_crash_stall_or_bloat_the_node() {
    hostile_peer(
        &[
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
        "/quic-v1",
    );
}

/// The attacks, from a peer connected over the hub's listen address that holds `transport`
/// (the hub initialised with `hub_init`).
fn hostile_peer(hub_init: &[&str], transport: &str) {
    let (hub, lab, mallory_home) = hub_lab_and_mallory_on(hub_init, &["--direction", "send"]);
    let victim = hub.id().parse().expect("hub id");
    let addr = hub
        .listen_addrs()
        .into_iter()
        .find(|a| a.contains(transport))
        .unwrap_or_else(|| panic!("the hub listens on {transport}"));
    let mut m = Mallory::connect(&mallory_home.home().join("identity.key"), victim, &addr);

    // Crafted changes over the wire: each is refused, the batch is answered.
    let attacks = [
        ("panic", craft::counter_bomb()),
        ("spin", craft::op_count_bomb()),
    ];
    for (i, (name, columns)) in attacks.into_iter().enumerate() {
        let h = header(&m, "Sample", &format!("S-{name}"));
        let change = crafted(&m, &h, &columns);
        // In a batch in log order, and ahead of it (protocol 7).
        let ahead = Message::Ahead {
            batch: 10 + i as u64,
            docs: vec![h.clone()],
            changes: vec![change.clone()],
        };
        let answers = m.send_all(vec![batch(i as u64 + 1, vec![h], vec![change]), ahead]);
        for answer in &answers {
            assert!(
                matches!(answer, Answer::Response(Message::Ack { rejected: 1, .. })),
                "{name}: {answer:?}"
            );
        }
        assert_still_healthy(&hub, &lab, name);
    }

    // Bogus Hellos with checkpoints the hub never had, many at once.
    let hellos: Vec<Message> = (0..20u64)
        .map(|n| Message::Hello {
            number: 100 + n,
            node: m.me(),
            name: "mallory".into(),
            resume: Checkpoint {
                seq: 1_000_000 + n,
                hash: [n as u8; 32],
            },
            tip: 0,
        })
        .collect();
    let answered = m
        .send_all(hellos)
        .iter()
        .filter(|a| matches!(a, Answer::Response(_)))
        .count();
    assert!(answered >= 1, "the hub answers a Hello");
    assert_still_healthy(&hub, &lab, "hellos");

    // Thousands of type names from a send-only peer: every change is refused, and the refusal
    // counts stay bounded.
    let mut docs = Vec::new();
    let mut changes = Vec::new();
    for n in 0..3_000 {
        let h = header(&m, &format!("T{n}"), "x");
        changes.push(crafted(&m, &h, &craft::one_op()));
        docs.push(h);
    }
    let answers = m.send_all(vec![batch(50, docs, changes)]);
    assert!(
        matches!(
            answers[0],
            Answer::Response(Message::Ack {
                rejected: 3_000,
                ..
            })
        ),
        "{:?}",
        answers[0]
    );
    let peer = hub.peer("mallory");
    let types = peer["rejected_types"].as_object().map_or(0, |t| t.len());
    assert!(types <= 65, "{types} refusal keys for one peer");
    assert_still_healthy(&hub, &lab, "types");

    // Many streams at once on one connection: past the cap the hub drops the streams (and the
    // connection of the peer that opened them), and is unharmed.
    let many: Vec<Message> = (0..40u64)
        .map(|n| batch(1_000 + n, Vec::new(), Vec::new()))
        .collect();
    let answers = m.send_all(many);
    let failed = answers
        .iter()
        .filter(|a| matches!(a, Answer::Failed(_)))
        .count();
    assert!(
        failed > 0,
        "40 streams at once were all served: {answers:?}"
    );
    assert_still_healthy(&hub, &lab, "streams");
}
