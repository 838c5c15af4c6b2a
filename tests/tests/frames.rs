//! Real node processes on 127.0.0.1 at the frame limit: large changes made while a peer was
//! away reach it, writes no frame could carry are refused, and published views cost what
//! changed, not their whole history.

use reqwest::Method;
use serde_json::json;
use tidesync_tests::{TestNode, wait_for};

/// Start two nodes that are peers of each other.
fn pair() -> [TestNode; 2] {
    let mut n = [TestNode::init("lab-a"), TestNode::init("lab-b")];
    for x in &mut n {
        x.start();
    }
    n[0].add_peer(&n[1], true);
    n[1].add_peer(&n[0], true);
    n
}

/// A JSON object of one field holding `len` bytes of `c`.
fn blob(c: char, len: usize) -> String {
    json!({ "data": c.to_string().repeat(len) }).to_string()
}

/// Bug: the sender checked the batch's byte limit before adding a change, not after, so two
/// 4 MiB objects written while the peer was away went out as one 8,389,015-byte frame, over
/// MAX_FRAME_BYTES; the receiver dropped the connection, the sender sent it again, forever,
/// and the peer never got the second object (nor anything behind it).
#[test]
fn two_four_mib_objects_written_while_the_peer_was_away_both_arrive() {
    let mut n = pair();
    n[0].ok(&["put", "Sample", "warm", r#"{"up":true}"#]);
    wait_for("the peers are in sync", || {
        n[1].get("Sample", "warm").is_some()
    });
    n[1].stop();
    // Each body is just under the API's 4 MiB object limit, and each change just under the
    // old 4 MiB batch limit, so that both went into one frame.
    let len = 4 * 1024 * 1024 - 256;
    for (id, c) in [("B-1", 'a'), ("B-2", 'b')] {
        let (code, reply) = n[0].http(
            Method::PUT,
            &format!("/v1/objects/Blob/{id}"),
            Some(&blob(c, len)),
        );
        assert_eq!(code, 200, "{reply}");
    }
    n[0].ok(&["put", "Sample", "after", r#"{"behind":"the blobs"}"#]);
    n[1].start();
    wait_for("both blobs and what follows them arrive", || {
        n[1].get("Sample", "after").is_some()
            && n[1].get("Blob", "B-1").is_some()
            && n[1].get("Blob", "B-2").is_some()
    });
    for (id, c) in [("B-1", 'a'), ("B-2", 'b')] {
        let got = n[1].get("Blob", id).expect("blob arrived");
        assert_eq!(got["data"].as_str().map(str::len), Some(len), "{id}");
        assert!(got["data"].as_str().unwrap().starts_with(c));
    }
    for node in &n {
        assert!(
            !node.log().contains("bad frame"),
            "{} dropped a connection over a bad frame",
            node.name
        );
    }
}

/// Bug: a local write whose change no frame could carry was stored and acknowledged, then
/// could never reach any peer (and blocked everything behind it in the log).
#[test]
fn writes_no_frame_could_carry_are_refused_and_nothing_is_stored() {
    let mut n = TestNode::init("lab");
    // Over MAX_LOCAL_CHANGE_BYTES (about 6 MiB): well over the API's PUT limit too.
    let big = blob('x', 7 * 1024 * 1024);
    // The CLI on a stopped node writes to the store itself.
    let out = n.cli_stdin(&["put", "Blob", "huge", "-"], Some(&big));
    assert!(!out.status.success(), "the CLI stored a too-large object");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MAX_LOCAL_CHANGE_BYTES"),
        "unclear error: {err}"
    );
    assert!(n.get("Blob", "huge").is_none());

    n.start();
    let items = json!([
        {"type": "Sample", "id": "small", "fields": {"ok": true}},
        {"type": "Blob", "id": "huge", "fields": {"data": "y".repeat(7 * 1024 * 1024)}},
    ])
    .to_string();
    let (code, reply) = n.http(Method::POST, "/v1/objects", Some(&items));
    assert_eq!(code, 400, "{reply}");
    assert!(
        reply.to_string().contains("MAX_LOCAL_CHANGE_BYTES"),
        "unclear error: {reply}"
    );
    let (code, _) = n.http(Method::PUT, "/v1/objects/Blob/huge", Some(&big));
    assert_eq!(code, 413);
    // The bulk write is all or nothing: not even the small object is stored.
    assert!(n.get("Blob", "huge").is_none());
    assert!(n.get("Sample", "small").is_none());
    assert_eq!(n.status()["last_seq"], 0);
}

/// Bug: every edit of an object published with `--fields` resent the view's whole history:
/// 400 edits of one field sent 17.6 MB.
#[test]
fn edits_of_a_published_field_send_only_the_new_view_changes() {
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
            "Entity",
            "--fields",
            "Entity=title",
        ],
    );
    n[1].add_peer_with(&n[0], true, &["--direction", "receive"]);
    let edit = |i: usize| {
        let body = json!({"title": format!("title-{i}"), "secret": format!("s-{i}")});
        let (code, reply) = n[0].http(
            Method::PUT,
            "/v1/objects/Entity/E-1",
            Some(&body.to_string()),
        );
        assert_eq!(code, 200, "{reply}");
    };
    edit(0);
    wait_for("the first title is public", || {
        n[1].get("Entity", "E-1")
            .is_some_and(|v| v["title"] == "title-0")
    });
    let before = n[0].status()["net"]["bytes_out"]
        .as_u64()
        .expect("bytes_out");
    const EDITS: usize = 400;
    for i in 1..=EDITS {
        edit(i);
    }
    wait_for("the last title is public", || {
        n[1].get("Entity", "E-1")
            .is_some_and(|v| v["title"] == format!("title-{EDITS}"))
    });
    let sent = n[0].status()["net"]["bytes_out"]
        .as_u64()
        .expect("bytes_out")
        - before;
    // One view change is a few hundred bytes; with its frame, a batch or two per edit stays
    // far under 4 KiB an edit. Resending the history costs about EDITS² / 2 view changes.
    assert!(
        sent < (EDITS as u64) * 4096,
        "{EDITS} edits sent {sent} bytes"
    );
    assert_eq!(
        n[1].get("Entity", "E-1"),
        Some(json!({"title": "title-400"}))
    );
}
