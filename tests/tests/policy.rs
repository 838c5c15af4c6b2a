//! Per-peer policies between real node processes on 127.0.0.1: migration, skipped types,
//! the SENAITE hub with prefixes and a read-only Method, and policy changes while running.
//!
//! A negative check ("B never got X") first waits for a marker written after X on the same
//! node: logs stream in order, so once the marker is there, X has been offered or filtered.

use serde_json::json;
use tidesync_tests::{TestNode, json, wait_for};

fn started(names: &[&str]) -> Vec<TestNode> {
    let mut nodes: Vec<TestNode> = names.iter().map(|n| TestNode::init(n)).collect();
    for n in &mut nodes {
        n.start();
    }
    nodes
}

fn put(node: &TestNode, ty: &str, id: &str, fields: serde_json::Value) {
    node.ok(&["put", ty, id, &fields.to_string()]);
}

fn ids(node: &TestNode, ty: &str) -> Vec<String> {
    let out = node.ok(&["ls", ty]);
    out.lines().map(str::to_string).collect()
}

fn refused(node: &TestNode, peer: &str, ty: &str) -> u64 {
    node.peer(peer)["rejected_types"][ty].as_u64().unwrap_or(0)
}

#[test]
fn a_new_node_migrates_with_direction_receive_and_keeps_tracking() {
    let n = started(&["old", "new"]);
    for i in 0..20 {
        put(&n[0], "Sample", &format!("S-{i}"), json!({"i": i}));
    }
    n[0].add_peer(&n[1], true);
    n[1].add_peer_with(&n[0], true, &["--direction", "receive"]);
    wait_for("the new node holds all 20", || {
        ids(&n[1], "Sample").len() == 20
    });
    // Writes on the new node never reach the old one; the old one's keep coming.
    put(&n[1], "Sample", "NEW-1", json!({"here": "new"}));
    put(&n[0], "Sample", "S-20", json!({"i": 20}));
    wait_for("tracking", || n[1].get("Sample", "S-20").is_some());
    put(&n[0], "Sample", "MARK", json!({}));
    wait_for("marker", || n[1].get("Sample", "MARK").is_some());
    assert!(n[0].get("Sample", "NEW-1").is_none());
    let ls = n[1].ok(&["peer", "ls"]);
    assert!(ls.contains("direction = \"receive\""), "{ls}");
}

#[test]
fn two_labs_sync_both_ways_and_each_keeps_one_type_to_itself() {
    let n = started(&["lab-a", "lab-b"]);
    n[0].add_peer_with(&n[1], true, &["--skip", "Invoice"]);
    n[1].add_peer_with(&n[0], true, &["--skip", "Invoice"]);
    put(&n[0], "Invoice", "I-A", json!({"amount": 100}));
    put(&n[1], "Invoice", "I-B", json!({"amount": 200}));
    put(&n[0], "Sample", "S-A", json!({"lab": "a"}));
    put(&n[1], "Sample", "S-B", json!({"lab": "b"}));
    wait_for("samples cross both ways", || {
        n[0].get("Sample", "S-B").is_some() && n[1].get("Sample", "S-A").is_some()
    });
    assert!(n[1].get("Invoice", "I-A").is_none());
    assert!(n[0].get("Invoice", "I-B").is_none());
}

#[test]
fn a_receiver_refuses_what_its_policy_excludes_even_from_a_peer_that_sends_it() {
    let mut n = [TestNode::init("rogue"), TestNode::init("lab")];
    n[0].start_with_env(&[("TIDESYNC_FAULT", "ignore-policy")]);
    n[1].start();
    // The rogue is told to skip Invoice but ignores it; the lab refuses Invoice itself.
    n[0].add_peer_with(&n[1], true, &["--skip", "Invoice"]);
    n[1].add_peer_with(&n[0], true, &["--skip", "Invoice"]);
    put(&n[0], "Invoice", "I-1", json!({"amount": 1}));
    put(&n[0], "Sample", "MARK", json!({}));
    wait_for("marker", || n[1].get("Sample", "MARK").is_some());
    assert!(n[1].get("Invoice", "I-1").is_none());
    wait_for("the refusal is counted per type", || {
        refused(&n[1], "rogue", "Invoice") == 1
    });
    let ls = n[1].ok(&["peer", "ls"]);
    assert!(ls.contains("refused by policy: Invoice 1"), "{ls}");
}

#[test]
fn update_only_takes_edits_to_our_objects_but_no_new_ones() {
    let n = started(&["lab", "remote"]);
    n[0].add_peer_with(&n[1], true, &["--update-only", "Sample"]);
    n[1].add_peer(&n[0], true);
    put(&n[0], "Sample", "OURS", json!({"v": 1}));
    wait_for("ours reaches the remote", || {
        n[1].get("Sample", "OURS").is_some()
    });
    put(&n[1], "Sample", "OURS", json!({"v": 2}));
    put(&n[1], "Sample", "THEIRS", json!({"v": 1}));
    put(&n[1], "Department", "MARK", json!({}));
    wait_for("the edit to ours arrives", || {
        n[0].get("Sample", "OURS")
            .is_some_and(|v| v["v"] == json!(2))
    });
    wait_for("marker", || n[0].get("Department", "MARK").is_some());
    assert!(n[0].get("Sample", "THEIRS").is_none());
    assert_eq!(refused(&n[0], "remote", "Sample"), 1);
}

/// SENAITE example 1 and 2: hub M with labs A and B. Samples arrive at M under the labs'
/// prefixes and edits at M go back only to their lab; Department flows among all three;
/// Method is M's: read-only at the labs, and a lab that edits it anyway is refused by M and
/// by the other lab.
#[test]
fn senaite_hub_with_prefixed_samples_and_a_read_only_method() {
    let mut n = [
        TestNode::init("m"),
        TestNode::init("a"),
        TestNode::init("b"),
    ];
    n[0].start();
    // Lab A ignores its own policy: it can edit Method and sends everything.
    n[1].start_with_env(&[("TIDESYNC_FAULT", "ignore-policy")]);
    n[2].start();
    for (lab, prefix) in [(1, "A_"), (2, "B_")] {
        n[0].add_peer_with(
            &n[lab],
            true,
            &[
                "--prefix",
                prefix,
                "--prefixed",
                "Sample,Analysis",
                "--send-only",
                "Method",
            ],
        );
        n[lab].add_peer_with(&n[0], true, &["--read-only", "Method"]);
    }
    put(
        &n[0],
        "Method",
        "HPLC-1",
        json!({"name": "HPLC", "version": 1}),
    );
    put(&n[0], "Department", "D-1", json!({"name": "Chemistry"}));
    put(
        &n[1],
        "Sample",
        "S-001",
        json!({"lab": "a", "status": "received"}),
    );
    put(
        &n[2],
        "Sample",
        "S-001",
        json!({"lab": "b", "status": "received"}),
    );
    wait_for("M holds both labs' samples under their prefixes", || {
        n[0].get("Sample", "A_S-001")
            .is_some_and(|v| v["lab"] == json!("a"))
            && n[0]
                .get("Sample", "B_S-001")
                .is_some_and(|v| v["lab"] == json!("b"))
    });
    wait_for("both labs hold M's Method and Department", || {
        (1..=2).all(|i| {
            n[i].get("Method", "HPLC-1").is_some() && n[i].get("Department", "D-1").is_some()
        })
    });
    // M edits A's sample: only A gets it, under its own name.
    put(
        &n[0],
        "Sample",
        "A_S-001",
        json!({"status": "analysed-at-m"}),
    );
    put(&n[0], "Department", "MARK", json!({}));
    wait_for("A gets M's edit as S-001", || {
        n[1].get("Sample", "S-001")
            .is_some_and(|v| v["status"] == json!("analysed-at-m"))
    });
    wait_for("marker at B", || n[2].get("Department", "MARK").is_some());
    assert_eq!(ids(&n[2], "Sample"), vec!["S-001".to_string()]);
    assert_eq!(n[2].get("Sample", "S-001").unwrap()["lab"], json!("b"));
    assert_eq!(
        n[2].get("Sample", "S-001").unwrap()["status"],
        json!("received")
    );

    // Lab B cannot edit the Method locally.
    let out = n[2].cli(&["put", "Method", "HPLC-1", r#"{"version": 2}"#]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));

    // Lab A edits it anyway and sends it to M and, over a direct link, to B: both refuse.
    n[2].add_peer(&n[1], true);
    n[1].add_peer(&n[2], true);
    put(&n[1], "Method", "HPLC-1", json!({"version": 99}));
    put(&n[1], "Department", "MARK-A", json!({}));
    wait_for("marker from A at M and B", || {
        n[0].get("Department", "MARK-A").is_some() && n[2].get("Department", "MARK-A").is_some()
    });
    wait_for("M and B count the refused Method edit", || {
        refused(&n[0], "a", "Method") >= 1 && refused(&n[2], "a", "Method") >= 1
    });
    for i in [0, 2] {
        assert_eq!(
            n[i].get("Method", "HPLC-1").unwrap()["version"],
            json!(1),
            "{} took the forged Method edit",
            n[i].name
        );
    }
}

#[test]
fn widening_a_policy_backfills_without_a_restart() {
    let n = started(&["lab-a", "lab-b"]);
    n[0].add_peer_with(&n[1], true, &["--skip", "Invoice"]);
    n[1].add_peer(&n[0], true);
    put(&n[0], "Invoice", "I-1", json!({"amount": 5}));
    put(&n[0], "Sample", "MARK", json!({}));
    wait_for("marker", || n[1].get("Sample", "MARK").is_some());
    assert!(n[1].get("Invoice", "I-1").is_none());
    n[0].ok(&["peer", "set", "lab-b", "--skip", ""]);
    wait_for("the skipped invoice is backfilled", || {
        n[1].get("Invoice", "I-1").is_some()
    });
    // Narrowing stops further exchange of the type; what was sent stays.
    n[0].ok(&["peer", "set", "lab-b", "--skip", "Invoice"]);
    put(&n[0], "Invoice", "I-2", json!({"amount": 6}));
    put(&n[0], "Sample", "MARK-2", json!({}));
    wait_for("marker 2", || n[1].get("Sample", "MARK-2").is_some());
    assert!(n[1].get("Invoice", "I-2").is_none());
    assert!(n[1].get("Invoice", "I-1").is_some());
}

#[test]
fn two_labs_objects_under_one_name_both_survive_and_are_listed_as_a_conflict() {
    let mut n = started(&["hub", "lab-a", "lab-b"]);
    for lab in 1..=2 {
        n[0].add_peer(&n[lab], true);
        n[lab].add_peer(&n[0], false);
    }
    put(&n[1], "Sample", "S-001", json!({"lab": "a"}));
    put(&n[2], "Sample", "S-001", json!({"lab": "b"}));
    wait_for("the hub holds both", || ids(&n[0], "Sample").len() == 2);
    let listed = n[0].ok(&["conflicts", "--json"]);
    let conflicts: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(conflicts.len(), 1, "{listed}");
    let renamed = conflicts[0]["local_id"].as_str().unwrap().to_string();
    assert!(renamed.starts_with("S-001~"), "{renamed}");
    let labs: Vec<serde_json::Value> = ["S-001", renamed.as_str()]
        .iter()
        .map(|id| n[0].get("Sample", id).unwrap()["lab"].clone())
        .collect();
    assert!(
        labs.contains(&json!("a")) && labs.contains(&json!("b")),
        "{labs:?}"
    );
    assert!(n[0].ok(&["conflicts"]).contains(&renamed));
    // `status` shows the collision too.
    assert_eq!(n[0].status()["collisions"], json!(1));
    assert!(n[0].ok(&["status"]).contains("conflicts: 1 objects"));

    // Resolved by renaming the one kept under its collision name (names are local).
    let taken = n[0].cli(&["rename", "Sample", &renamed, "S-001"]);
    assert_eq!(taken.status.code(), Some(1), "{taken:?}");
    assert!(String::from_utf8_lossy(&taken.stderr).contains("already has that name"));
    let marked = n[0].cli(&["rename", "Sample", &renamed, "S-001~x"]);
    assert_eq!(marked.status.code(), Some(1), "{marked:?}");
    let missing = n[0].cli(&["rename", "Sample", "S-404", "S-405"]);
    assert_eq!(missing.status.code(), Some(3), "{missing:?}");
    let kept = n[0].get("Sample", &renamed).unwrap()["lab"].clone();
    let reply = json(&n[0].ok(&["rename", "Sample", &renamed, "S-001-second"]));
    assert_eq!(reply["was_collision"], json!(true), "{reply}");
    assert_eq!(reply["doc"], conflicts[0]["doc"], "{reply}");
    assert!(n[0].get("Sample", &renamed).is_none());
    assert_eq!(n[0].get("Sample", "S-001-second").unwrap()["lab"], kept);
    assert_eq!(n[0].ok(&["conflicts", "--json"]).trim(), "[]");
    assert_eq!(n[0].status()["collisions"], json!(0));
    // A later edit from the lab that wrote it reaches it under its new name, and the other
    // lab's object keeps the plain name.
    let (writer, other) = if kept == json!("a") { (1, 2) } else { (2, 1) };
    put(
        &n[writer],
        "Sample",
        "S-001",
        json!({"note": "after the rename"}),
    );
    wait_for("the edit reaches the renamed object", || {
        n[0].get("Sample", "S-001-second")
            .is_some_and(|v| v["note"] == json!("after the rename"))
    });
    assert_ne!(n[0].get("Sample", "S-001").unwrap()["lab"], kept);
    assert_eq!(
        n[other].get("Sample", "S-001").unwrap()["note"],
        json!(null)
    );
    assert_eq!(ids(&n[0], "Sample").len(), 2);
    assert_eq!(n[0].ok(&["conflicts", "--json"]).trim(), "[]");
    // The new name is durable: it holds after a restart.
    n[0].stop();
    n[0].start();
    assert_eq!(n[0].get("Sample", "S-001-second").unwrap()["lab"], kept);
    assert_eq!(n[0].status()["collisions"], json!(0));
}

/// BIIGLE: the lab sends only Volumes to the archive, and the LabelTrees and Users a Volume
/// references travel with it (a LabelTree's members in turn); unreferenced ones stay home.
/// With `rogue`, the lab ignores its own policy and sends everything: the archive's own
/// `--types Volume --refs ...` then takes the objects referenced within what it receives and
/// refuses the rest.
fn volumes_carry_their_references(rogue: bool) {
    let mut n = [TestNode::init("lab"), TestNode::init("archive")];
    if rogue {
        n[0].start_with_env(&[("TIDESYNC_FAULT", "ignore-policy")]);
    } else {
        n[0].start();
    }
    n[1].start();
    let policy = [
        "--types",
        "Volume",
        "--refs",
        "Volume=label_trees:LabelTree,owner:User",
        "--refs",
        "LabelTree=members:User",
    ];
    // The honest lab is linked while it writes, so each object goes out on its own. The
    // rogue's objects all travel in one batch, as the archive must see a referenced object
    // with its referrer: one that arrived alone earlier was refused then.
    let link = |n: &[TestNode; 2]| {
        n[0].add_peer_with(&n[1], true, &policy);
        n[1].add_peer_with(&n[0], true, &policy);
    };
    if !rogue {
        link(&n);
    }
    for u in ["u-1", "u-2", "u-3"] {
        put(&n[0], "User", u, json!({"name": u}));
    }
    put(&n[0], "LabelTree", "LT-1", json!({"members": ["User/u-2"]}));
    put(&n[0], "LabelTree", "LT-2", json!({"members": ["User/u-3"]}));
    put(&n[0], "Sample", "S-1", json!({}));
    put(
        &n[0],
        "Volume",
        "V-1",
        json!({"label_trees": ["LabelTree/LT-1"], "owner": "User/u-1"}),
    );
    if rogue {
        link(&n);
    }
    wait_for("the volume and its references arrive", || {
        n[1].get("Volume", "V-1").is_some()
            && n[1].get("LabelTree", "LT-1").is_some()
            && n[1].get("User", "u-1").is_some()
            && n[1].get("User", "u-2").is_some()
    });
    // A carried object stays up to date at the peer.
    put(
        &n[0],
        "LabelTree",
        "LT-1",
        json!({"members": ["User/u-2"], "v": 2}),
    );
    wait_for("the referenced label tree's edit arrives", || {
        n[1].get("LabelTree", "LT-1").is_some_and(|v| v["v"] == 2)
    });
    put(&n[0], "Volume", "MARK", json!({}));
    wait_for("marker", || n[1].get("Volume", "MARK").is_some());
    assert!(n[1].get("LabelTree", "LT-2").is_none());
    assert!(n[1].get("User", "u-3").is_none());
    assert!(n[1].get("Sample", "S-1").is_none());
    if rogue {
        assert!(refused(&n[1], "lab", "LabelTree") >= 1);
        assert!(refused(&n[1], "lab", "Sample") >= 1);
    }
}

#[test]
fn biigle_volumes_carry_their_label_trees_and_users() {
    volumes_carry_their_references(false);
}

#[test]
fn a_receiver_takes_referenced_objects_and_refuses_unreferenced_ones() {
    volumes_carry_their_references(true);
}

/// Two hubs: lab A is attached to hub 1, lab B to hub 2, and the hubs to each other. Each
/// lab's objects and edits reach the other lab through both hubs, verified at every step.
#[test]
fn labs_on_different_hubs_converge_through_the_hub_to_hub_link() {
    let n = started(&["lab-a", "hub-1", "hub-2", "lab-b"]);
    for (x, y) in [(0, 1), (1, 2), (2, 3)] {
        n[x].add_peer(&n[y], true);
        n[y].add_peer(&n[x], true);
    }
    put(&n[0], "Sample", "S-A", json!({"lab": "a"}));
    put(&n[3], "Sample", "S-B", json!({"lab": "b"}));
    wait_for("both samples everywhere", || {
        n.iter()
            .all(|x| x.get("Sample", "S-A").is_some() && x.get("Sample", "S-B").is_some())
    });
    // Concurrent edits to different fields of one object, from both ends.
    put(&n[0], "Sample", "S-A", json!({"lab": "a", "volume_ml": 2}));
    put(
        &n[3],
        "Sample",
        "S-A",
        json!({"lab": "a", "status": "done"}),
    );
    wait_for("the edits merge the same everywhere", || {
        let all: Vec<_> = n.iter().map(|x| x.get("Sample", "S-A")).collect();
        all.iter().all(|v| v == &all[0])
            && all[0]
                .as_ref()
                .is_some_and(|v| v["volume_ml"] == 2 && v["status"] == "done")
    });
}

/// `--types` alone, at the sender: only the listed types go out.
#[test]
fn types_alone_sends_only_the_listed_types() {
    let n = started(&["lab-a", "lab-b"]);
    n[0].add_peer_with(&n[1], true, &["--types", "Sample"]);
    n[1].add_peer(&n[0], true);
    put(&n[0], "Method", "M-1", json!({"v": 1}));
    put(&n[0], "Sample", "S-1", json!({"v": 1}));
    put(&n[0], "Sample", "MARK", json!({}));
    wait_for("marker", || n[1].get("Sample", "MARK").is_some());
    assert!(n[1].get("Sample", "S-1").is_some());
    assert!(n[1].get("Method", "M-1").is_none());
}

/// `--types` alone, at the receiver: a peer that sends other types anyway is refused, and the
/// refusals are counted per type.
#[test]
fn types_alone_takes_only_the_listed_types_from_a_peer_that_sends_more() {
    let mut n = [TestNode::init("rogue"), TestNode::init("lab")];
    n[0].start_with_env(&[("TIDESYNC_FAULT", "ignore-policy")]);
    n[1].start();
    n[0].add_peer(&n[1], true);
    n[1].add_peer_with(&n[0], true, &["--types", "Sample"]);
    put(&n[0], "Method", "M-1", json!({"v": 1}));
    put(&n[0], "Sample", "MARK", json!({}));
    wait_for("marker", || n[1].get("Sample", "MARK").is_some());
    assert!(n[1].get("Method", "M-1").is_none());
    assert_eq!(refused(&n[1], "rogue", "Method"), 1);
}

/// `--direction send`: we send to the peer and never take from it, even when it sends.
#[test]
fn direction_send_publishes_and_refuses_what_comes_back() {
    let n = started(&["publisher", "mirror"]);
    n[0].add_peer_with(&n[1], true, &["--direction", "send"]);
    n[1].add_peer(&n[0], true);
    put(&n[0], "Sample", "S-P", json!({"from": "publisher"}));
    wait_for("published", || n[1].get("Sample", "S-P").is_some());
    // The mirror's own policy lets it send; the publisher refuses its object and its edit.
    put(&n[1], "Sample", "S-M", json!({"from": "mirror"}));
    put(&n[1], "Sample", "S-P", json!({"from": "mirror"}));
    wait_for("the publisher refused both", || {
        refused(&n[0], "mirror", "Sample") >= 2
    });
    assert!(n[0].get("Sample", "S-M").is_none());
    assert_eq!(
        n[0].get("Sample", "S-P"),
        Some(json!({"from": "publisher"}))
    );
}

/// Whether `needle` occurs anywhere in the file's bytes.
fn file_holds(path: &std::path::Path, needle: &str) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Uwazi: a private archive publishes Entity with only `title` and `date` to a public node.
/// No byte of the other fields' values, in any version, is in the public node's redb file;
/// the published values are (so the scan can find what is there).
#[test]
fn uwazi_publishes_only_whitelisted_fields_and_the_public_store_never_holds_the_rest() {
    let mut n = [TestNode::init("private"), TestNode::init("public")];
    for x in &mut n {
        x.start();
    }
    n[0].add_peer_with(
        &n[1],
        true,
        &[
            "--direction",
            "send",
            "--types",
            "Entity,Template",
            "--fields",
            "Entity=title,date",
        ],
    );
    n[1].add_peer_with(&n[0], true, &["--direction", "receive"]);
    put(
        &n[0],
        "Template",
        "T-1",
        json!({"name": "TEMPLATE-NAME-7f3a"}),
    );
    put(
        &n[0],
        "Entity",
        "E-1",
        json!({"title": "TITLE-ONE-91c2", "date": "2024-05-01", "informant": "SECRET-NAME-a41b"}),
    );
    put(
        &n[0],
        "Entity",
        "E-1",
        json!({"title": "TITLE-TWO-5d0e", "informant": "SECRET-NAME-c7d9"}),
    );
    put(&n[0], "Case", "C-1", json!({"note": "SECRET-CASE-33aa"}));
    wait_for("the second title is public", || {
        n[1].get("Entity", "E-1")
            .is_some_and(|v| v["title"] == "TITLE-TWO-5d0e")
    });
    assert_eq!(
        n[1].get("Entity", "E-1"),
        Some(json!({"title": "TITLE-TWO-5d0e", "date": "2024-05-01"}))
    );
    assert!(n[1].get("Template", "T-1").is_some());
    // The private archive keeps everything.
    assert_eq!(
        n[0].get("Entity", "E-1").unwrap()["informant"],
        "SECRET-NAME-c7d9"
    );
    // A deletion is published too.
    n[0].ok(&["rm", "Entity", "E-1"]);
    wait_for("the deletion is public", || {
        n[1].get("Entity", "E-1").is_none()
    });
    n[1].stop();
    let store = n[1].home().join("store.redb");
    for secret in ["SECRET-NAME-a41b", "SECRET-NAME-c7d9", "SECRET-CASE-33aa"] {
        assert!(
            !file_holds(&store, secret),
            "{secret} is in the public store"
        );
    }
    for public in ["TITLE-ONE-91c2", "TITLE-TWO-5d0e", "TEMPLATE-NAME-7f3a"] {
        assert!(
            file_holds(&store, public),
            "{public} should be in the public store"
        );
    }
}
