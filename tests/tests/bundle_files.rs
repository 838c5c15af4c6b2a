//! Files in bundles through real node processes: a ship takes a volume's metadata ashore in
//! one bundle, the shore's bundle back says which images it lacks, and the ship's next bundle
//! carries them; streamed through the HTTP API of a running node and read by a stopped one.

use serde_json::{Value, json};
use tidesync_tests::{TestNode, content, json};

fn missing(node: &TestNode) -> Vec<Value> {
    json(&node.ok(&["file", "ls", "--missing", "--json"]))
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_ship_takes_metadata_ashore_first_and_the_images_in_its_next_bundle() {
    let mut ship = TestNode::init("ship");
    let mut shore = TestNode::init("shore");
    ship.start();
    shore.start();
    // Peers that never dial each other: everything crosses in bundles.
    ship.add_peer(&shore, false);
    shore.add_peer(&ship, false);
    let dir = tempfile::tempdir().unwrap();
    let bundle = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let mut images = Vec::new();
    for i in 0..12u32 {
        let bytes = content(300_000 + i as usize * 1_000, i);
        let path = dir.path().join(format!("img-{i:04}.jpg"));
        std::fs::write(&path, &bytes).unwrap();
        ship.ok(&[
            "put",
            "Image",
            &format!("I-{i:04}"),
            r#"{"volume":"V-1"}"#,
            "--file",
            &format!("image={}", path.display()),
        ]);
        images.push(bytes);
    }

    // Metadata only, exported by the running ship (streamed from its API).
    let meta = bundle("meta.tsb");
    let ex = json(&ship.ok(&[
        "export",
        "--for",
        "shore",
        "--no-files",
        "--out",
        &meta,
        "--json",
    ]));
    assert_eq!(
        (ex["changes"].clone(), ex["files"].clone()),
        (json!(12), json!(0))
    );
    assert!(std::fs::metadata(&meta).unwrap().len() < 100_000);
    let im = json(&shore.ok(&["import", "--json", &meta]));
    assert_eq!(
        (
            im["added"].clone(),
            im["files"].clone(),
            im["files_stored"].clone()
        ),
        (json!(12), json!(0), json!(0))
    );
    assert_eq!(missing(&shore).len(), 12, "the shore wants every image");

    // The shore's bundle back names them; the ship's next bundle carries them.
    let back = bundle("back.tsb");
    let ex = json(&shore.ok(&["export", "--for", "ship", "--out", &back, "--json"]));
    assert_eq!(ex["wants"], json!(12));
    ship.ok(&["import", &back]);
    let full = bundle("files.tsb");
    let ex = json(&ship.ok(&["export", "--for", "shore", "--out", &full, "--json"]));
    let total: u64 = images.iter().map(|b| b.len() as u64).sum();
    assert_eq!(
        (
            ex["changes"].clone(),
            ex["files"].clone(),
            ex["file_bytes"].clone()
        ),
        (json!(0), json!(12), json!(total))
    );
    let raw = std::fs::read(&full).unwrap();
    assert!(
        !raw.windows(64).any(|w| w == &images[3][1000..1064]),
        "an encrypted bundle shows no file's bytes"
    );

    // The shore imports it stopped (read from the file), then serves every image whole.
    shore.stop();
    let im = json(&shore.ok(&["import", "--json", &full]));
    assert_eq!(
        (
            im["files"].clone(),
            im["files_stored"].clone(),
            im["file_bytes_stored"].clone()
        ),
        (json!(12), json!(12), json!(total))
    );
    shore.start();
    assert!(missing(&shore).is_empty());
    for (i, bytes) in images.iter().enumerate() {
        let object = shore.get("Image", &format!("I-{i:04}")).unwrap();
        let hash = object["image"]["$file"].as_str().unwrap().to_string();
        let out = dir.path().join(format!("got-{i}"));
        shore.ok(&["file", "get", &hash, "--out", out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == *bytes, "image {i} whole");
    }
    // The same bundle imported again by the running shore (uploaded to its API) stores nothing.
    let im = json(&shore.ok(&["import", "--json", &full]));
    assert_eq!(
        (im["duplicates"].clone(), im["files_stored"].clone()),
        (json!(0), json!(0))
    );
}
