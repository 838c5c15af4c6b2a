//! Tests of the sans-IO engine: local writes, received changes, holding and release.

use super::*;
use serde_json::json;

fn engine(secret: u8, epoch: u64) -> Engine {
    Engine::new(Identity::from_secret([secret; 32]), epoch)
}

fn names() -> (TypeName, ObjectId) {
    (
        TypeName::new("Sample").unwrap(),
        ObjectId::new("S-001").unwrap(),
    )
}

fn changed(o: WriteOutcome) -> Persist {
    match o {
        WriteOutcome::Changed(p) => p,
        WriteOutcome::Unchanged(_) => panic!("expected a change"),
    }
}

#[test]
fn a_local_write_is_a_verifiable_change_by_this_node() {
    let e = engine(1, 7);
    let (t, i) = names();
    let fields = json!({"status": "received"});
    let p = changed(
        e.local_write(
            1_700_000_000_123,
            &t,
            &i,
            None,
            WriteOp::Put(fields.as_object().unwrap()),
        )
        .unwrap(),
    );
    let v = p.change.verify().unwrap();
    assert_eq!(v.author, e.node_id());
    assert_eq!(v.hash, p.hash);
    assert_eq!(p.doc_id, DocId::derive(&e.node_id(), &t, &i));
    assert_eq!(p.record.origin, e.node_id());
    assert_eq!(v.change.timestamp(), 1_700_000_000);
    assert_eq!(v.change.message(), Some("create"));
}

#[test]
fn two_nodes_creating_the_same_name_make_different_documents() {
    let (t, i) = names();
    let f = json!({"a": 1});
    let a = changed(
        engine(1, 1)
            .local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
            .unwrap(),
    );
    let b = changed(
        engine(2, 1)
            .local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
            .unwrap(),
    );
    assert_ne!(a.doc_id, b.doc_id);
}

#[test]
fn restarting_uses_a_new_actor_so_sequence_numbers_are_never_reused() {
    let (t, i) = names();
    let f = json!({"a": 1});
    let first = changed(
        engine(1, 1)
            .local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
            .unwrap(),
    );
    let loaded = Loaded {
        doc_id: first.doc_id,
        record: first.record.clone(),
        doc: first.doc,
    };
    let g = json!({"a": 2});
    let second = changed(
        engine(1, 2)
            .local_write(
                0,
                &t,
                &i,
                Some(loaded),
                WriteOp::Put(g.as_object().unwrap()),
            )
            .unwrap(),
    );
    let (c1, c2) = (
        first.change.verify().unwrap().change,
        second.change.verify().unwrap().change,
    );
    assert_ne!(c1.actor_id(), c2.actor_id());
    assert_eq!(
        second.change.verify().unwrap().author,
        first.change.verify().unwrap().author
    );
}

#[test]
fn identical_puts_are_unchanged_and_deleting_twice_is_not_found() {
    let e = engine(1, 1);
    let (t, i) = names();
    let f = json!({"a": 1});
    let p = changed(
        e.local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
            .unwrap(),
    );
    let loaded = Loaded {
        doc_id: p.doc_id,
        record: p.record,
        doc: p.doc,
    };
    let loaded = match e
        .local_write(
            0,
            &t,
            &i,
            Some(loaded),
            WriteOp::Put(f.as_object().unwrap()),
        )
        .unwrap()
    {
        WriteOutcome::Unchanged(l) => l,
        WriteOutcome::Changed(_) => panic!("identical put made a change"),
    };
    let d = changed(
        e.local_write(0, &t, &i, Some(loaded), WriteOp::Delete)
            .unwrap(),
    );
    assert!(!d.record.live);
    let loaded = Loaded {
        doc_id: d.doc_id,
        record: d.record,
        doc: d.doc,
    };
    assert!(matches!(
        e.local_write(0, &t, &i, Some(loaded), WriteOp::Delete),
        Err(WriteError::NotFound { .. })
    ));
    assert!(matches!(
        e.local_write(0, &t, &i, None, WriteOp::Delete),
        Err(WriteError::NotFound { .. })
    ));
}

fn header(p: &Persist) -> DocHeader {
    DocHeader {
        doc: p.doc_id,
        origin: p.record.origin,
        ty: p.record.ty.clone(),
        id: p.record.id.clone(),
    }
}

fn arrive(
    e: &Engine,
    h: &DocHeader,
    existing: Option<(DocRecord, Automerge)>,
    held: Vec<SignedChange>,
    incoming: Vec<&SignedChange>,
) -> Arrived {
    e.receive(Arrival {
        existing,
        held: held.into_iter().map(|c| (c, None)).collect(),
        ..arrival_of(h, None, &incoming)
    })
}

#[test]
fn changes_arriving_before_their_dependencies_are_held_then_applied() {
    let (t, i) = names();
    let a = engine(1, 1);
    let f1 = json!({"a": 1});
    let p1 = changed(
        a.local_write(0, &t, &i, None, WriteOp::Put(f1.as_object().unwrap()))
            .unwrap(),
    );
    let h = header(&p1);
    let c1 = p1.change.clone();
    let f2 = json!({"b": 2});
    let loaded = Loaded {
        doc_id: p1.doc_id,
        record: p1.record.clone(),
        doc: p1.doc,
    };
    let p2 = changed(
        a.local_write(
            0,
            &t,
            &i,
            Some(loaded),
            WriteOp::Put(f2.as_object().unwrap()),
        )
        .unwrap(),
    );

    let b = engine(2, 1);
    // The second change first: nothing can be applied, it is held.
    let first = arrive(&b, &h, None, vec![], vec![&p2.change]);
    assert!(first.received.applied.is_empty() && first.received.record.is_none());
    assert_eq!(first.received.held.len(), 1);
    // Then the first: both apply, in order, and the held one is released.
    let second = arrive(&b, &h, None, vec![p2.change.clone()], vec![&c1]);
    let hashes: Vec<_> = second
        .received
        .applied
        .iter()
        .map(|(_, h, _, _)| *h)
        .collect();
    assert_eq!(hashes, vec![p1.hash, p2.hash]);
    assert_eq!(second.received.released, vec![p2.hash]);
    assert!(second.received.held.is_empty());
    let doc = second.doc.unwrap();
    assert_eq!(Json::Object(doc::to_json(&doc)), json!({"a": 1, "b": 2}));
    assert_eq!(second.received.record.unwrap().origin, a.node_id());
}

#[test]
fn only_the_origin_may_create_a_document() {
    let (t, i) = names();
    let mallory = engine(3, 1);
    let f = json!({"a": 1});
    let p = changed(
        mallory
            .local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
            .unwrap(),
    );
    // Mallory claims the document was created by node 1.
    let victim = engine(1, 1).node_id();
    let h = DocHeader {
        doc: DocId::derive(&victim, &t, &i),
        origin: victim,
        ty: t.clone(),
        id: i.clone(),
    };
    let forged = SignedChange::sign(
        mallory.identity.signing_key(),
        h.doc,
        &p.change.verify().unwrap().change,
    );
    let out = arrive(&engine(2, 1), &h, None, vec![], vec![&forged]);
    assert_eq!(out.rejected.len(), 1);
    assert!(out.received.applied.is_empty());
}

#[test]
fn a_received_document_whose_name_is_taken_gets_its_own_name() {
    let (t, i) = names();
    let f = json!({"a": 1});
    let p = changed(
        engine(1, 1)
            .local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
            .unwrap(),
    );
    let h = header(&p);
    let out = engine(2, 1).receive(Arrival {
        header: h.clone(),
        from: h.origin,
        existing: None,
        held: vec![],
        incoming: vec![(p.change.clone(), p.change.verify().unwrap())],
        name: h.id.clone(),
        name_taken: true,
        one_by_one: false,
        bans: Default::default(),
    });
    let local = out.received.record.unwrap().local_id;
    assert_eq!(local.as_str(), format!("S-001~{}", h.doc));
}

#[test]
fn an_empty_put_creates_an_empty_object() {
    let e = engine(1, 1);
    let (t, i) = names();
    let p = changed(
        e.local_write(0, &t, &i, None, WriteOp::Put(&Map::new()))
            .unwrap(),
    );
    assert!(p.record.live);
    assert!(p.change.verify().is_ok());
}

// Regression: releasing a chain that arrived in reverse order rescanned every waiting
// change after each apply (quadratic: 10,000 took 24 s on the actor), and a released change
// was logged as sent by the peer of the batch that released it, so it was never sent back
// to its real sender. Release now follows dependency order, and keeps each sender.
#[test]
fn a_reversed_chain_is_released_in_dependency_order_keeping_its_senders() {
    let (t, i) = names();
    let a = engine(1, 1);
    let mut changes = Vec::new();
    let mut loaded: Option<Loaded> = None;
    for n in 0..300 {
        let f = json!({ "n": n });
        let p = changed(
            a.local_write(
                0,
                &t,
                &i,
                loaded.take(),
                WriteOp::Put(f.as_object().unwrap()),
            )
            .unwrap(),
        );
        changes.push((p.change.clone(), p.hash));
        loaded = Some(Loaded {
            doc_id: p.doc_id,
            record: p.record.clone(),
            doc: p.doc,
        });
    }
    let h = DocHeader {
        doc: loaded.as_ref().unwrap().doc_id,
        origin: a.node_id(),
        ty: t.clone(),
        id: i.clone(),
    };
    let b = engine(2, 1);
    let early = NodeId([9; 32]);
    // Everything but the creation arrived earlier, newest first, from `early`.
    let held: Vec<(SignedChange, Option<NodeId>)> = changes[1..]
        .iter()
        .rev()
        .map(|(c, _)| (c.clone(), Some(early)))
        .collect();
    let out = b.receive(Arrival {
        header: h.clone(),
        from: h.origin,
        existing: None,
        held,
        incoming: vec![(changes[0].0.clone(), changes[0].0.verify().unwrap())],
        name: h.id.clone(),
        name_taken: false,
        one_by_one: false,
        bans: Default::default(),
    });
    let order: Vec<_> = out.received.applied.iter().map(|(_, h, _, _)| *h).collect();
    let expected: Vec<_> = changes.iter().map(|(_, h)| *h).collect();
    assert_eq!(order, expected);
    assert_eq!(out.received.released.len(), 299);
    assert_eq!(out.received.applied[0].3, Some(h.origin));
    assert!(out.received.applied[1..].iter().all(|a| a.3 == Some(early)));
    assert_eq!(
        Json::Object(doc::to_json(&out.doc.unwrap())),
        json!({ "n": 299 })
    );
}

/// An arrival of `incoming` at a node holding `existing`.
fn arrival_of(
    h: &DocHeader,
    existing: Option<(DocRecord, Automerge)>,
    incoming: &[&SignedChange],
) -> Arrival {
    Arrival {
        header: h.clone(),
        from: h.origin,
        existing,
        held: Vec::new(),
        incoming: incoming
            .iter()
            .map(|s| ((*s).clone(), s.verify().unwrap()))
            .collect(),
        name: h.id.clone(),
        name_taken: false,
        one_by_one: false,
        bans: Default::default(),
    }
}

// Regression: an author that signed two changes with one actor and sequence number forked
// the document for good: each receiver kept the side it saw first and refused the other.
#[test]
fn an_equivocation_is_cut_out_the_same_way_whatever_the_order() {
    let author = engine(1, 1);
    let (t, i) = names();
    let created = changed(
        author
            .local_write(
                1_000,
                &t,
                &i,
                None,
                WriteOp::Put(&json!({"v": 0}).as_object().unwrap().clone()),
            )
            .unwrap(),
    );
    let side = |v: i64| {
        let loaded = Loaded {
            doc_id: created.doc_id,
            record: created.record.clone(),
            doc: created.doc.clone(),
        };
        let fields = json!({ "v": v }).as_object().unwrap().clone();
        changed(
            author
                .local_write(2_000, &t, &i, Some(loaded), WriteOp::Put(&fields))
                .unwrap(),
        )
    };
    let (one, two) = (side(1), side(2));
    assert_ne!(one.hash, two.hash);
    let h = header(&created);
    let hub = engine(2, 1);
    let base = arrive(&hub, &h, None, vec![], vec![&created.change]);
    let base = (base.received.record.unwrap(), base.doc.unwrap());
    let mut heads = Vec::new();
    for (first, second) in [(&one, &two), (&two, &one)] {
        let got = arrive(&hub, &h, Some(base.clone()), vec![], vec![&first.change]);
        let got = (got.received.record.unwrap(), got.doc.unwrap());
        // The shell applies a batch again one change at a time when Automerge refuses it.
        let failed = arrive(&hub, &h, Some(got.clone()), vec![], vec![&second.change]);
        assert!(failed.poisoned.is_some_and(|p| p.hash.is_none()));
        let found = hub.receive(Arrival {
            one_by_one: true,
            ..arrival_of(&h, Some(got), &[&second.change])
        });
        assert_eq!(found.found.len(), 1, "the equivocation is found");
        assert_eq!(found.found[0].first.as_ref().err(), Some(&first.hash));
        assert!(found.received.banned.contains(&first.hash));
        assert!(found.received.banned.contains(&second.hash));
        assert_eq!(
            found.received.applied.len(),
            1,
            "the second side joins the log"
        );
        heads.push(found.doc.unwrap().get_heads());
    }
    assert_eq!(heads[0], heads[1]);
    assert_eq!(heads[0], vec![created.hash], "both sides are cut out");
    // Both sides in one batch: the batch apply fails, and one change at a time finds it.
    let batch = arrive(
        &hub,
        &h,
        Some(base.clone()),
        vec![],
        vec![&one.change, &two.change],
    );
    assert!(batch.poisoned.is_some_and(|p| p.hash.is_none()));
    let one_by_one = hub.receive(Arrival {
        one_by_one: true,
        ..arrival_of(&h, Some(base), &[&one.change, &two.change])
    });
    assert_eq!(one_by_one.found.len(), 1);
    assert!(
        one_by_one.found[0].first.is_ok(),
        "the first side came in the same batch"
    );
    assert_eq!(one_by_one.doc.unwrap().get_heads(), vec![created.hash]);
}
