//! Policies and identities hold between real node processes on 127.0.0.1: after a restart,
//! after `kill -9`, against a replaced key, against a peer that follows references or
//! writes into another lab's objects, and without leaking what a peer may not see.
//!
//! A negative check ("B never got X") first waits for a marker written after X on the same
//! node: logs stream in order, so once the marker is there, X has been offered or filtered.

use serde_json::json;
use tidesync_tests::{TestNode, json, wait_for};

fn put(node: &TestNode, ty: &str, id: &str, fields: serde_json::Value) {
    node.ok(&["put", ty, id, &fields.to_string()]);
}

fn refused(node: &TestNode, peer: &str, ty: &str) -> u64 {
    node.peer(peer)["rejected_types"][ty].as_u64().unwrap_or(0)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn file_has(path: &std::path::Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// A hub that skips the lab's `Invoice`, after the lab's invoice and a marker went by.
fn hub_skipping_invoices() -> (TestNode, TestNode) {
    let mut hub = TestNode::init("hub");
    let mut lab = TestNode::init("lab");
    hub.start();
    lab.start();
    hub.add_peer_with(&lab, true, &["--skip", "Invoice"]);
    lab.add_peer(&hub, true);
    put(&lab, "Invoice", "I-1", json!({"amount": 1}));
    put(&lab, "Sample", "MARK", json!({}));
    wait_for("the marker reaches the hub", || {
        hub.get("Sample", "MARK").is_some()
    });
    assert!(hub.get("Invoice", "I-1").is_none());
    (hub, lab)
}

// Regression: policies lived only in config.toml, so a widening made while the node was
// stopped (or whose reset a `kill -9` lost) counted as the policy at the next start, and
// what the narrow policy had refused was never asked for again.
#[test]
fn a_widening_made_by_editing_the_config_of_a_killed_node_is_backfilled_at_start() {
    let (mut hub, _lab) = hub_skipping_invoices();
    hub.signal("KILL");
    let file = hub.home().join("config.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let edited: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("skip"))
        .collect();
    assert!(edited.len() < text.lines().count(), "{text}");
    std::fs::write(&file, edited.join("\n")).unwrap();
    hub.start();
    wait_for("the invoice is backfilled", || {
        hub.get("Invoice", "I-1").is_some()
    });
}

// Regression: `peer rm` then `peer add` with a wider policy kept the old checkpoints, so
// nothing the old policy had refused ever came.
#[test]
fn a_peer_removed_and_added_again_starts_from_zero() {
    let (hub, lab) = hub_skipping_invoices();
    hub.ok(&["peer", "rm", "lab"]);
    hub.add_peer(&lab, true);
    wait_for(
        "the invoice arrives from the start of the lab's log",
        || hub.get("Invoice", "I-1").is_some(),
    );
}

// Regression: replacing a peer's key under the same name left the old key trusted: a bundle
// it signed was imported, and changes it signed kept being taken through other peers.
#[test]
fn a_replaced_key_is_revoked_and_what_it_signed_before_stays_valid() {
    let mut hub = TestNode::init("hub");
    let mut old = TestNode::init("lab");
    let mut new = TestNode::init("lab-new");
    for n in [&mut hub, &mut old, &mut new] {
        n.start();
    }
    hub.add_peer(&old, true);
    old.add_peer(&hub, true);
    put(&old, "Sample", "OLD-1", json!({"v": 1}));
    wait_for("the old key's sample arrives", || {
        hub.get("Sample", "OLD-1").is_some()
    });
    // The lab's key is replaced: same name, new key.
    let addr = new.listen_addr();
    hub.ok(&["peer", "add", "lab", "--id", &new.id(), "--addr", &addr]);
    new.add_peer(&hub, true);
    // The old key still reaches the new lab, which relays what it signs.
    new.add_peer(&old, true);
    old.add_peer(&new, true);
    put(&old, "Sample", "OLD-2", json!({"v": 2}));
    let bundle = old.home().parent().unwrap().join("old.tsb");
    old.ok(&["export", "--for", "hub", "--out", bundle.to_str().unwrap()]);
    let out = hub.cli(&["import", bundle.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
    wait_for("the new lab holds the old key's new sample", || {
        new.get("Sample", "OLD-2").is_some()
    });
    put(&new, "Sample", "MARK", json!({}));
    wait_for("the new lab's marker reaches the hub", || {
        hub.get("Sample", "MARK").is_some()
    });
    assert!(hub.get("Sample", "OLD-2").is_none());
    assert!(refused(&hub, "lab", "Sample") >= 1);
    // What the old key signed before the replacement is kept and still verifies.
    let history = json(&hub.ok(&["history", "Sample", "OLD-1", "--json"]));
    let changes = history["changes"].as_array().unwrap();
    assert!(!changes.is_empty());
    assert!(changes.iter().all(|c| c["verified"] == true), "{history}");
    // The revocation survives a restart.
    hub.stop();
    hub.start();
    put(&new, "Sample", "MARK-2", json!({}));
    wait_for("the second marker", || {
        hub.get("Sample", "MARK-2").is_some()
    });
    assert!(hub.get("Sample", "OLD-2").is_none());
}

// Regression: `--refs` carried any type a reference field named past the receiver's
// `--types` and `--skip`, for good: a hub stored a lab's skipped `Invoice` and an unlisted
// `Secret` that the lab's Volume referenced, and took their later edits too.
#[test]
fn references_name_their_target_types_and_skip_always_wins() {
    let mut hub = TestNode::init("hub");
    let mut lab = TestNode::init("lab");
    hub.start();
    // The lab ignores its own policy: it sends everything it has.
    lab.start_with_env(&[("TIDESYNC_FAULT", "ignore-policy")]);
    // The old form, without target types, is refused with the new one.
    let out = hub.cli(&[
        "peer",
        "add",
        "lab",
        "--id",
        &lab.id(),
        "--refs",
        "Volume=owner",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("owner:User"), "{}", stderr(&out));
    put(&lab, "User", "u-1", json!({"name": "ada"}));
    put(&lab, "Invoice", "I-1", json!({"amount": 7}));
    put(&lab, "Secret", "X-1", json!({"code": 42}));
    put(
        &lab,
        "Volume",
        "V-1",
        json!({"owner": "User/u-1", "bill": "Invoice/I-1"}),
    );
    put(&lab, "Volume", "V-2", json!({"owner": "Secret/X-1"}));
    hub.add_peer_with(
        &lab,
        true,
        &[
            "--types",
            "Sample,Volume",
            "--skip",
            "Invoice",
            "--refs",
            "Volume=owner:User,bill:Invoice",
        ],
    );
    lab.add_peer(&hub, true);
    wait_for("the volumes and the referenced user arrive", || {
        hub.get("Volume", "V-2").is_some() && hub.get("User", "u-1").is_some()
    });
    put(&lab, "Invoice", "I-1", json!({"amount": 8}));
    put(&lab, "Volume", "MARK", json!({}));
    wait_for("marker", || hub.get("Volume", "MARK").is_some());
    assert!(hub.get("Invoice", "I-1").is_none(), "skip wins over refs");
    assert!(
        hub.get("Secret", "X-1").is_none(),
        "owner references Users only"
    );
    // Narrowing ends the carrying: the user's later edits stop flowing.
    hub.ok(&["peer", "set", "lab", "--refs", "Volume="]);
    put(&lab, "User", "u-1", json!({"name": "ada", "v": 2}));
    put(&lab, "Volume", "MARK-2", json!({}));
    wait_for("second marker", || hub.get("Volume", "MARK-2").is_some());
    assert_eq!(hub.get("User", "u-1").unwrap(), json!({"name": "ada"}));
}

// Regression: an id too long to take a peer's prefix silently kept its raw name, and any
// peer's changes to lab A's prefixed samples were taken at the hub and relayed back to A.
#[test]
fn a_prefixed_labs_objects_are_its_own_and_an_id_that_cannot_take_the_prefix_is_refused() {
    let mut hub = TestNode::init("hub");
    let mut a = TestNode::init("a");
    let mut b = TestNode::init("b");
    for n in [&mut hub, &mut a, &mut b] {
        n.start();
    }
    for (lab, prefix) in [(&a, "A_"), (&b, "B_")] {
        hub.add_peer_with(lab, true, &["--prefix", prefix, "--prefixed", "Sample"]);
        lab.add_peer(&hub, true);
    }
    // The labs also sync with each other directly, everything both ways.
    a.add_peer(&b, true);
    b.add_peer(&a, true);
    put(&a, "Sample", "S-1", json!({"v": 1}));
    let long = "L".repeat(255);
    put(&a, "Sample", &long, json!({"long": true}));
    wait_for("the hub holds A's sample under A's prefix", || {
        hub.get("Sample", "A_S-1").is_some()
    });
    wait_for("B holds A's sample", || b.get("Sample", "S-1").is_some());
    // B edits A's sample; A takes the edit (its policy for B allows it) and relays it.
    put(&b, "Sample", "S-1", json!({"v": 2}));
    wait_for("A holds B's edit", || {
        a.get("Sample", "S-1").is_some_and(|v| v["v"] == 2)
    });
    put(&a, "Department", "MARK-A", json!({}));
    put(&b, "Department", "MARK-B", json!({}));
    wait_for("both markers reach the hub", || {
        hub.get("Department", "MARK-A").is_some() && hub.get("Department", "MARK-B").is_some()
    });
    assert_eq!(hub.get("Sample", "A_S-1").unwrap(), json!({"v": 1}));
    assert!(hub.get("Sample", &long).is_none());
    assert!(refused(&hub, "a", "Sample") >= 1, "the long id is refused");
    assert!(refused(&hub, "a", "Sample") + refused(&hub, "b", "Sample") >= 2);
}

// Regression: checkpoints carried the hash of the last entry scanned, skipped ones
// included: a bundle's `upto` and the peer's stored checkpoint equalled the hash of the full,
// unpublished change behind a `--fields` view, which let the peer test guesses offline.
#[test]
fn no_hash_of_a_change_a_peer_may_not_see_leaves_the_node() {
    let mut private = TestNode::init("private");
    let mut public = TestNode::init("public");
    private.start();
    public.start();
    private.add_peer_with(
        &public,
        true,
        &["--direction", "send", "--fields", "Entity=title"],
    );
    public.add_peer_with(&private, true, &["--direction", "receive"]);
    put(
        &private,
        "Entity",
        "E-1",
        json!({"title": "T", "informant": "SECRET"}),
    );
    wait_for("the view is public", || {
        public.get("Entity", "E-1").is_some()
    });
    let history = json(&private.ok(&["history", "Entity", "E-1", "--json"]));
    let hash = history["changes"][0]["hash"].as_str().unwrap().to_string();
    let hash: Vec<u8> = (0..hash.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hash[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(hash.len(), 32);
    let bundle = private.home().parent().unwrap().join("view.tsb");
    private.ok(&[
        "export",
        "--for",
        "public",
        "--all",
        "--plain",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    assert!(
        !file_has(&bundle, &hash),
        "the bundle holds the hidden change's hash"
    );
    public.stop();
    assert!(
        !file_has(&public.home().join("store.redb"), &hash),
        "the public store holds the hidden change's hash"
    );
}

// Regression: `~` was allowed in ids, so a peer could claim `S-001~<hex>` before the
// collision that would give another document that name; ids with bidi controls or invisible
// characters could pass for another object's.
#[test]
fn ids_that_could_claim_a_collision_name_or_hide_characters_are_refused() {
    let mut n = TestNode::init("lab");
    n.start();
    for id in ["S-001~0123abcd", "S-\u{202E}100", "S\u{200B}-001"] {
        let out = n.cli(&["put", "Sample", id, "{}"]);
        assert!(!out.status.success(), "{id:?} was taken");
        assert!(
            stderr(&out).contains("cannot name a new object"),
            "{}",
            stderr(&out)
        );
    }
    put(&n, "Sample", "S-001", json!({}));
}

// Regression: an author signed two different changes with the same actor and sequence
// number and sent one to each hub. The hubs ended with different values for good, and one
// held the other's later edits forever (they depended on a change it would never apply).
#[test]
fn an_equivocation_is_found_by_both_hubs_which_end_with_the_same_document() {
    let mut mallory = TestNode::init("mallory");
    let mut hub1 = TestNode::init("hub1");
    let mut hub2 = TestNode::init("hub2");
    mallory.start_with_env(&[("TIDESYNC_FAULT", "equivocate")]);
    hub1.start();
    hub2.start();
    mallory.add_peer(&hub1, false);
    mallory.add_peer(&hub2, false);
    hub1.add_peer(&mallory, true);
    hub2.add_peer(&mallory, true);
    put(&mallory, "Sample", "S-1", json!({"v": 0}));
    wait_for("both hubs have the sample", || {
        hub1.get("Sample", "S-1").is_some() && hub2.get("Sample", "S-1").is_some()
    });
    // One hub gets this change, the other its signed twin.
    put(&mallory, "Sample", "S-1", json!({"v": 1}));
    wait_for("both hubs take mallory's second change", || {
        hub1.get("Sample", "S-1") != Some(json!({"v": 0}))
            && hub2.get("Sample", "S-1") != Some(json!({"v": 0}))
    });
    let (one, two) = (hub1.get("Sample", "S-1"), hub2.get("Sample", "S-1"));
    assert_ne!(one, two, "each hub got its own side");
    // An honest edit on top of one side: refused with it, and its author writes on under
    // a new actor afterwards.
    put(&hub1, "Sample", "S-1", json!({"note": "built on one side"}));
    hub1.add_peer(&hub2, true);
    hub2.add_peer(&hub1, false);
    let found = |n: &TestNode| n.status()["equivocations"].as_u64() == Some(1);
    wait_for("both hubs find the equivocation", || {
        found(&hub1) && found(&hub2)
    });
    wait_for(
        "both hubs end with the document without either side",
        || {
            hub1.get("Sample", "S-1") == Some(json!({"v": 0}))
                && hub2.get("Sample", "S-1") == Some(json!({"v": 0}))
        },
    );
    for hub in [&hub1, &hub2] {
        let status = hub.status();
        assert_eq!(status["equivocators"], json!([mallory.id()]), "{status}");
        assert!(status["refused_for_equivocation"].as_u64().unwrap() >= 2);
        let conflicts = json(&hub.ok(&["conflicts", "--json"]));
        let e = conflicts
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["kind"] == "equivocation")
            .unwrap_or_else(|| panic!("{conflicts}"));
        assert_eq!(e["equivocation"]["author"], json!(mallory.id()));
        assert_eq!(e["id"], "S-1");
        assert!(
            hub.ok(&["conflicts"])
                .contains("equivocation in Sample/S-1")
        );
    }
    // Later changes of the equivocating actor are refused; honest edits still flow, and the
    // hub whose own edit was refused is not taken for an equivocator.
    put(&mallory, "Sample", "S-1", json!({"v": 2}));
    put(&hub1, "Sample", "S-1", json!({"after": true}));
    wait_for("the honest edit reaches the other hub", || {
        hub2.get("Sample", "S-1") == Some(json!({"v": 0, "after": true}))
    });
    assert_eq!(
        hub1.get("Sample", "S-1"),
        Some(json!({"v": 0, "after": true}))
    );
    assert_eq!(hub2.status()["equivocations"], json!(1));
    // The evidence survives a restart.
    hub2.stop();
    hub2.start();
    assert_eq!(hub2.status()["equivocations"], json!(1));
}

// Regression: views shared their object's DocId, and every peer got the same one. A peer
// that held the object before `--fields` was set for it refused the view (same actor and
// sequence number) and kept the secret field for good; after a publisher restart the view
// merged into the object as a second root.
#[test]
fn a_peer_holding_the_full_object_reads_only_the_published_fields_once_a_view_replaces_it() {
    let mut lab = TestNode::init("lab");
    let mut hub = TestNode::init("hub");
    let mut archive = TestNode::init("archive");
    for n in [&mut lab, &mut hub, &mut archive] {
        n.start();
    }
    lab.add_peer(&hub, true);
    lab.add_peer_with(&archive, true, &["--fields", "Entity=title"]);
    hub.add_peer(&lab, false);
    archive.add_peer(&lab, false);
    put(
        &lab,
        "Entity",
        "E-1",
        json!({"title": "first", "informant": "SECRET-7c1"}),
    );
    wait_for("the hub holds the whole object", || {
        hub.get("Entity", "E-1")
            .is_some_and(|v| v["informant"] == "SECRET-7c1")
    });
    wait_for("the archive holds its view", || {
        archive.get("Entity", "E-1") == Some(json!({"title": "first"}))
    });
    lab.ok(&["peer", "set", "hub", "--fields", "Entity=title"]);
    put(&lab, "Entity", "E-1", json!({"title": "second"}));
    wait_for("the hub reads the view under the object's name", || {
        hub.get("Entity", "E-1") == Some(json!({"title": "second"}))
    });
    // The hub is told: the object it held is kept under its own name, listed as replaced.
    let conflicts = json(&hub.ok(&["conflicts", "--json"]));
    let replaced = conflicts
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "replaced-by-view")
        .unwrap_or_else(|| panic!("{conflicts}"));
    assert_eq!(replaced["id"], "E-1");
    assert!(hub.ok(&["conflicts"]).contains("now shares only a view"));
    // Each peer's view has its own id, neither the object's nor the other's.
    let doc_of = |n: &TestNode| json(&n.ok(&["history", "--json", "Entity", "E-1"]))["doc"].clone();
    let (object, at_hub, at_archive) = (doc_of(&lab), doc_of(&hub), doc_of(&archive));
    assert_ne!(at_hub, object);
    assert_ne!(at_archive, object);
    assert_ne!(at_hub, at_archive);
    // After the publisher restarts, the view is still one document with the published field.
    lab.stop();
    lab.start();
    put(
        &lab,
        "Entity",
        "E-1",
        json!({"title": "third", "informant": "SECRET-9d2"}),
    );
    wait_for("the third title reaches the hub and the archive", || {
        hub.get("Entity", "E-1") == Some(json!({"title": "third"}))
            && archive.get("Entity", "E-1") == Some(json!({"title": "third"}))
    });
    let history = json(&hub.ok(&["history", "--json", "Entity", "E-1"]));
    let roots = history["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["deps"].as_array().is_some_and(|d| d.is_empty()))
        .count();
    assert_eq!(roots, 1, "{history}");
    hub.stop();
    hub.start();
    assert_eq!(hub.get("Entity", "E-1"), Some(json!({"title": "third"})));
}
