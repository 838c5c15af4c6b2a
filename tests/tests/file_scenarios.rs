//! Files with their records, in the shape our users' systems have them, through real node
//! processes: a BIIGLE volume of 1,000 images goes from a ship to the shore with `--refs`
//! bringing its label trees and users, and the images follow.

use reqwest::Method;
use serde_json::{Value, json};
use tidesync_tests::bench::request;
use tidesync_tests::{TestNode, content, json, wait_for};

const IMAGES: usize = 1_000;

fn put(node: &TestNode, ty: &str, id: &str, fields: Value) {
    node.ok(&["put", ty, id, &fields.to_string()]);
}

#[test]
fn a_biigle_volume_of_1000_images_goes_ashore_with_its_label_trees_users_and_images() {
    let (mut ship, mut shore) = (TestNode::init("ship"), TestNode::init("shore"));
    ship.start();
    shore.start();
    // Volumes and their images go; the label trees and users a volume refers to travel with
    // it; nothing else does.
    let policy = [
        "--types",
        "Volume,Image",
        "--refs",
        "Volume=label_trees:LabelTree,owner:User",
        "--refs",
        "LabelTree=members:User",
    ];
    for u in ["u-1", "u-2", "u-3"] {
        put(&ship, "User", u, json!({"name": u}));
    }
    put(&ship, "LabelTree", "LT-1", json!({"members": ["User/u-2"]}));
    put(&ship, "LabelTree", "LT-2", json!({"members": ["User/u-3"]}));
    put(&ship, "Sample", "S-1", json!({"kept": "aboard"}));
    put(
        &ship,
        "Volume",
        "V-1",
        json!({"label_trees": ["LabelTree/LT-1"], "owner": "User/u-1", "url": "ship://transect-7"}),
    );
    // The images: each uploaded to the ship's API, then referred to by its own object.
    let mut hashes = Vec::with_capacity(IMAGES);
    let mut items = Vec::with_capacity(IMAGES);
    for i in 0..IMAGES {
        let bytes = content(8_000 + i * 7, i as u32);
        let stored = request(
            &ship,
            Method::POST,
            "/v1/files",
            Some(bytes),
            "application/octet-stream",
        );
        let hash = stored["hash"].as_str().unwrap().to_string();
        items.push(json!({"type": "Image", "id": format!("I-{i:04}"), "fields": {
            "volume": "Volume/V-1",
            "filename": format!("img-{i:04}.jpg"),
            "file": {"$file": hash, "size": stored["size"], "name": format!("img-{i:04}.jpg"), "type": "image/jpeg"},
        }}));
        hashes.push(hash);
    }
    for chunk in items.chunks(250) {
        let (s, v) = ship.http(
            Method::POST,
            "/v1/objects",
            Some(&Value::Array(chunk.to_vec()).to_string()),
        );
        assert_eq!(s, 200, "{v}");
    }

    ship.add_peer_with(&shore, false, &policy);
    shore.add_peer_with(&ship, true, &policy);
    wait_for("the volume, its references and every image record", || {
        let objects = &shore.status()["objects"];
        objects["Image"]["live"] == json!(IMAGES) && shore.get("Volume", "V-1").is_some()
    });
    wait_for("every image file", || {
        json(&shore.ok(&["file", "ls", "--json"]))
            .as_array()
            .unwrap()
            .len()
            == IMAGES
    });
    for (ty, id) in [("LabelTree", "LT-1"), ("User", "u-1"), ("User", "u-2")] {
        assert!(
            shore.get(ty, id).is_some(),
            "{ty}/{id} travels with the volume"
        );
    }
    for (ty, id) in [("LabelTree", "LT-2"), ("User", "u-3"), ("Sample", "S-1")] {
        assert!(shore.get(ty, id).is_none(), "{ty}/{id} stays aboard");
    }
    let missing = json(&shore.ok(&["file", "ls", "--missing", "--json"]));
    assert_eq!(missing, json!([]));
    // Spot checks: the bytes are the ship's.
    let dir = tempfile::tempdir().unwrap();
    for i in [0, 499, 999] {
        let out = dir.path().join(format!("img-{i}"));
        shore.ok(&["file", "get", &hashes[i], "--out", out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == content(8_000 + i * 7, i as u32));
    }
    shore.stop();
    ship.stop();
}
