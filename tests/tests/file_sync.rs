//! Files between real node processes on 127.0.0.1: a file follows the object that refers to
//! it (and is relayed on), a file only a hidden field refers to never leaves, a peer serving
//! corrupted segments is caught and the file comes from an honest one, a download cut by
//! `kill -9` carries on after a restart, and one whose link is cut every 64 MiB completes with
//! each verified segment sent once.

use std::path::Path;

use serde_json::{Value, json};
use tidesync_tests::{TestNode, content, json, wait_for};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

/// The hashes of the files stored on `node`.
fn stored(node: &TestNode) -> Vec<String> {
    let files = json(&node.ok(&["file", "ls", "--json"]));
    files
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["hash"].as_str().unwrap().to_string())
        .collect()
}

fn missing(node: &TestNode) -> Vec<Value> {
    json(&node.ok(&["file", "ls", "--missing", "--json"]))
        .as_array()
        .unwrap()
        .clone()
}

/// The stored bytes of file `hash` on `node`, read back through its CLI.
fn read_back(node: &TestNode, hash: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}-{hash}",
        node.home().display().to_string().len()
    ));
    node.ok(&["file", "get", hash, "--out", out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

/// Whether `needle` occurs anywhere in the files under `dir` (recursively).
fn found_under(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            found_under(&p, needle)
        } else {
            std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        }
    })
}

#[test]
fn a_result_report_follows_its_sample_from_lab_to_hub_and_on_to_another_lab() {
    let dir = tempfile::tempdir().unwrap();
    let (mut lab, mut hub, mut lab2) = (
        TestNode::init("lab"),
        TestNode::init("hub"),
        TestNode::init("lab2"),
    );
    for n in [&mut lab, &mut hub, &mut lab2] {
        n.start();
    }
    hub.add_peer(&lab, false);
    hub.add_peer(&lab2, false);
    lab.add_peer(&hub, true);
    lab2.add_peer(&hub, true);
    let report = content(5 * 1024 * 1024 + 4321, 1);
    let path = write(dir.path(), "report.pdf", &report);
    let put = lab.ok(&[
        "put",
        "Sample",
        "S-001",
        r#"{"status":"analysed"}"#,
        "--file",
        &format!("report={path}"),
    ]);
    assert!(put.contains("changed"), "{put}");
    let sample = lab.get("Sample", "S-001").unwrap();
    let hash = sample["report"]["$file"].as_str().unwrap().to_string();
    assert_eq!(sample["report"]["name"], "report.pdf");
    assert_eq!(sample["report"]["type"], "application/pdf");

    for node in [&hub, &lab2] {
        wait_for("the report to follow its sample", || {
            stored(node).contains(&hash)
        });
        assert_eq!(read_back(node, &hash, dir.path()), report);
        assert!(missing(node).is_empty());
        assert_eq!(
            node.get("Sample", "S-001").unwrap()["report"]["$file"],
            hash.as_str()
        );
    }
    // Status shows the bytes each way; the hub fetched from the lab and served lab2.
    let len = report.len() as u64;
    let counted = |status: &Value, peer: &TestNode, way: &str| {
        status["files"]["peers"][peer.id()][way]
            .as_u64()
            .unwrap_or(0)
    };
    wait_for("status to show the bytes each way", || {
        let status = hub.status();
        counted(&status, &lab, "bytes_in") >= len && counted(&status, &lab2, "bytes_out") >= len
    });
    assert!(hub.status()["net"]["file_bytes_in"].as_u64().unwrap() >= len);
    // The file feed, beside the change feed, says the report arrived.
    let (code, feed) = lab2.http(reqwest::Method::GET, "/v1/changes?files_since=0", None);
    assert_eq!(code, 200, "{feed}");
    assert!(
        feed["files"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["hash"] == hash.as_str() && e["size"] == len),
        "{feed}"
    );
    // Scrub: the hub's copy rots on disk; verify finds it and fetches it again from the lab.
    let rotted_path = hub.home().join("files").join(&hash[..2]).join(&hash);
    let mut rotted = std::fs::read(&rotted_path).unwrap();
    rotted[12_345] ^= 0x20;
    std::fs::write(&rotted_path, &rotted).unwrap();
    let out = hub.cli(&["file", "verify", "--json"]);
    let scrub = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(scrub["rotted"][0], hash.as_str(), "{scrub}");
    assert_eq!(scrub["refetching"][0], hash.as_str(), "{scrub}");
    wait_for("the rotted report to be fetched again", || {
        stored(&hub).contains(&hash)
    });
    assert!(read_back(&hub, &hash, dir.path()) == report);
    assert!(hub.ok(&["file", "verify"]).contains("0 rotted"));
    // A file over the peer's --max-file-bytes stays home; a small one still comes.
    lab2.ok(&["peer", "set", "hub", "--max-file-bytes", "1000000"]);
    let big = content(2_000_000, 2);
    let small = content(10_000, 3);
    let (big_path, small_path) = (
        write(dir.path(), "big.tif", &big),
        write(dir.path(), "small.csv", &small),
    );
    lab.ok(&[
        "put",
        "Sample",
        "S-002",
        "{}",
        "--file",
        &format!("image={big_path}"),
        "--file",
        &format!("data={small_path}"),
    ]);
    let s2 = lab.get("Sample", "S-002").unwrap();
    let (big_hash, small_hash) = (
        s2["image"]["$file"].as_str().unwrap().to_string(),
        s2["data"]["$file"].as_str().unwrap().to_string(),
    );
    wait_for("the small file to reach lab2", || {
        stored(&lab2).contains(&small_hash)
    });
    wait_for("the big file to reach the hub", || {
        stored(&hub).contains(&big_hash)
    });
    assert!(!stored(&lab2).contains(&big_hash));
    assert!(
        missing(&lab2)
            .iter()
            .all(|m| m["hash"] != big_hash.as_str()),
        "a file over the rule is not even wanted"
    );
    // Garbage collection: once no object refers to the report, `file gc` removes it, and
    // keeps what is still referred to.
    lab.ok(&["put", "Sample", "S-001", r#"{"report":null}"#]);
    let gc = json(&lab.ok(&["file", "gc", "--grace", "0", "--json"]));
    assert_eq!(gc["removed"], serde_json::json!([hash]), "{gc}");
    assert!(!stored(&lab).contains(&hash));
    assert!(stored(&lab).contains(&big_hash) && stored(&lab).contains(&small_hash));
    for n in [&mut lab, &mut hub, &mut lab2] {
        n.stop();
    }
}

#[test]
fn a_file_only_a_hidden_field_refers_to_never_reaches_a_public_node() {
    let dir = tempfile::tempdir().unwrap();
    let (mut archive, mut public) = (TestNode::init("archive"), TestNode::init("public"));
    archive.start();
    public.start();
    public.add_peer(&archive, false);
    archive.add_peer_with(&public, true, &["--fields", "Entity=title,document"]);
    // Each file carries a marker that must never appear at the public node if hidden.
    let mut document = content(300_000, 4);
    document[1000..1020].copy_from_slice(b"PUBLIC-DOCUMENT-MARK");
    let mut attachment = content(300_000, 5);
    attachment[2000..2020].copy_from_slice(b"HIDDEN-ATTACHMENT-MK");
    let (doc_path, att_path) = (
        write(dir.path(), "document.pdf", &document),
        write(dir.path(), "attachment.pdf", &attachment),
    );
    archive.ok(&[
        "put",
        "Entity",
        "E-1",
        r#"{"title":"Case 1"}"#,
        "--file",
        &format!("document={doc_path}"),
        "--file",
        &format!("attachment={att_path}"),
    ]);
    let e = archive.get("Entity", "E-1").unwrap();
    let doc_hash = e["document"]["$file"].as_str().unwrap().to_string();
    wait_for("the published document to arrive", || {
        stored(&public).contains(&doc_hash)
    });
    let seen = public.get("Entity", "E-1").unwrap();
    assert!(seen.get("attachment").is_none(), "{seen}");
    assert_eq!(stored(&public), vec![doc_hash.clone()]);
    public.stop();
    archive.stop();
    let home = public.home();
    assert!(found_under(&home, b"PUBLIC-DOCUMENT-MARK"));
    assert!(
        !found_under(&home, b"HIDDEN-ATTACHMENT-MK"),
        "the hidden file's bytes are nowhere in the public node's files or store"
    );
}

#[test]
fn corrupted_segments_are_caught_and_the_file_comes_from_an_honest_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut liar, mut honest, mut lab) = (
        TestNode::init("liar"),
        TestNode::init("honest"),
        TestNode::init("lab"),
    );
    liar.start_with_env(&[("TIDESYNC_FAULT", "corrupt-files")]);
    honest.start();
    lab.start();
    // The lab takes the volume from both; the liar made it and serves it corrupted.
    liar.add_peer(&honest, true);
    honest.add_peer(&liar, false);
    let image = content(3 * 1024 * 1024 + 99, 6);
    let path = write(dir.path(), "image.png", &image);
    liar.ok(&[
        "put",
        "Volume",
        "V-1",
        "{}",
        "--file",
        &format!("image={path}"),
    ]);
    let hash = liar.get("Volume", "V-1").unwrap()["image"]["$file"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(
        "the honest node to catch the liar's segments and give up",
        || {
            honest.status()["files"]["peers"][liar.id()]["corrupt_segments"]
                .as_u64()
                .unwrap_or(0)
                > 0
        },
    );
    assert!(
        !stored(&honest).contains(&hash),
        "nothing corrupt is stored"
    );
    // The honest node gets the bytes another way (an upload of the same file), then serves.
    honest.ok(&["file", "add", &path]);
    assert!(missing(&honest).is_empty(), "the file it wanted is stored");
    lab.add_peer(&liar, true);
    lab.add_peer(&honest, true);
    liar.add_peer(&lab, false);
    honest.add_peer(&lab, false);
    wait_for("the lab to store the image from the honest peer", || {
        stored(&lab).contains(&hash)
    });
    assert_eq!(read_back(&lab, &hash, dir.path()), image);
    // Status is published twice a second: wait for it to show the bytes.
    wait_for("the lab's status to show where the bytes came from", || {
        let status = lab.status();
        let peer =
            |p: &TestNode, k: &str| status["files"]["peers"][p.id()][k].as_u64().unwrap_or(0);
        peer(&honest, "bytes_in") + peer(&liar, "bytes_in") >= image.len() as u64
    });
    for n in [&mut liar, &mut honest, &mut lab] {
        n.stop();
    }
}

#[test]
fn a_download_killed_with_sigkill_carries_on_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ship, mut shore) = (TestNode::init("ship"), TestNode::init("shore"));
    ship.start();
    shore.start();
    ship.add_peer(&shore, false);
    shore.add_peer(&ship, true);
    let video = content(256 * 1024 * 1024, 7);
    let path = write(dir.path(), "dive.mp4", &video);
    ship.ok(&[
        "put",
        "Volume",
        "V-9",
        "{}",
        "--file",
        &format!("video={path}"),
    ]);
    let hash = ship.get("Volume", "V-9").unwrap()["video"]["$file"]
        .as_str()
        .unwrap()
        .to_string();
    let done = |node: &TestNode| -> u64 {
        missing(node)
            .iter()
            .find(|m| m["hash"] == hash.as_str())
            .map_or(0, |m| m["segments_done"].as_u64().unwrap())
    };
    wait_for("part of the video to be durable at the shore", || {
        done(&shore) >= 4
    });
    shore.signal("KILL");
    let kept = done(&shore);
    assert!(
        kept > 0 && kept < 256 && !stored(&shore).contains(&hash),
        "the download was cut part way, and its progress survives kill -9 ({kept} segments)"
    );
    shore.start();
    wait_for("the video to be stored at the shore", || {
        stored(&shore).contains(&hash)
    });
    assert!(read_back(&shore, &hash, dir.path()) == video);
    assert!(missing(&shore).is_empty());
    shore.stop();
    ship.stop();
}

#[test]
fn a_transfer_cut_every_64_mib_completes_and_each_verified_segment_comes_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ship, mut shore) = (TestNode::init("ship"), TestNode::init("shore"));
    ship.start();
    shore.start();
    let video = content(192 * 1024 * 1024, 11);
    let path = write(dir.path(), "transect.mp4", &video);
    ship.ok(&[
        "put",
        "Volume",
        "V-64",
        "{}",
        "--file",
        &format!("video={path}"),
    ]);
    let hash = ship.get("Volume", "V-64").unwrap()["video"]["$file"]
        .as_str()
        .unwrap()
        .to_string();
    // The shore reaches the ship only through a proxy that cuts every connection after 64 MiB.
    let ship_addr = ship.listen_addr();
    let port: u16 = ship_addr.rsplit('/').next().unwrap().parse().unwrap();
    let proxy = tidesync_tests::proxy::FlakyProxy::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        64 * 1024 * 1024,
    );
    ship.add_peer(&shore, false);
    let via = format!("/ip4/127.0.0.1/tcp/{}", proxy.addr().port());
    shore.ok(&["peer", "add", "ship", "--id", &ship.id(), "--addr", &via]);
    wait_for("the video to be stored at the shore", || {
        stored(&shore).contains(&hash)
    });
    let size = video.len() as u64;
    // Status counts a segment's bytes when the node publishes it (every half second).
    let verified = || shore.status()["files"]["peers"][ship.id()]["bytes_in"].clone();
    wait_for("status to count the last segments", || {
        verified().as_u64().unwrap_or(0) >= size
    });
    let verified = verified();
    let served = ship.status()["files"]["peers"][shore.id()]["bytes_out"]
        .as_u64()
        .unwrap();
    eprintln!(
        "64 MiB cuts: {} connections, {} cut midway, {} bytes through the proxy; {size} bytes of file, {served} served, {verified} verified",
        proxy.connections(),
        proxy.cuts(),
        proxy.bytes()
    );
    assert!(proxy.cuts() >= 2, "the link was cut during the transfer");
    assert_eq!(verified, json!(size), "each verified segment came once");
    assert!(served >= size);
    assert!(read_back(&shore, &hash, dir.path()) == video);
    shore.stop();
    ship.stop();
}
