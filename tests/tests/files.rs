//! Files through a real node process: stored content-addressed and durable, read back whole
//! and in ranges over HTTP with the hash as ETag, listed, referenced from a field, on a running
//! node and on a stopped one (moving them between nodes: `file_sync.rs`).

use std::time::Duration;

use serde_json::json;
use tidesync_tests::{TestNode, content, json};

/// A raw request to the running node: status, headers and body bytes.
fn raw(
    node: &TestNode,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    let mut req = client.request(method, format!("{}{path}", node.api_url()));
    if let Some(t) = node.token() {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (status, h, resp.bytes().unwrap().to_vec())
}

#[test]
fn a_stored_file_is_served_whole_and_in_ranges_referenced_from_a_field_and_kept_across_restarts() {
    let mut node = TestNode::init("lab");
    node.start();
    let dir = tempfile::tempdir().unwrap();
    let bytes = content(3 * 1024 * 1024 + 5, 0);
    let path = dir.path().join("report.pdf");
    std::fs::write(&path, &bytes).unwrap();

    let added = json(&node.ok(&["file", "add", path.to_str().unwrap()]));
    let hash = added["hash"].as_str().unwrap().to_string();
    assert_eq!(added["size"], json!(bytes.len()));
    assert_eq!(hash.len(), 64);
    let file_url = format!("/v1/files/{hash}");

    // Whole, with the hash as its ETag.
    let (status, h, body) = raw(&node, reqwest::Method::GET, &file_url, &[], None);
    assert_eq!(status, 200);
    assert!(body == bytes, "the file comes back whole");
    let etag = format!("\"{hash}\"");
    assert_eq!(h["etag"], etag.as_str());
    assert_eq!(h["accept-ranges"], "bytes");
    // Ranges.
    let (status, h, body) = raw(
        &node,
        reqwest::Method::GET,
        &file_url,
        &[("range", "bytes=100-199")],
        None,
    );
    assert_eq!((status, body.as_slice()), (206, &bytes[100..200]));
    assert_eq!(
        h["content-range"],
        format!("bytes 100-199/{}", bytes.len()).as_str()
    );
    let (status, _, body) = raw(
        &node,
        reqwest::Method::GET,
        &file_url,
        &[("range", "bytes=-10")],
        None,
    );
    assert_eq!((status, body.as_slice()), (206, &bytes[bytes.len() - 10..]));
    let (status, h, _) = raw(
        &node,
        reqwest::Method::GET,
        &file_url,
        &[("range", "bytes=99999999-")],
        None,
    );
    assert_eq!(status, 416);
    assert_eq!(
        h["content-range"],
        format!("bytes */{}", bytes.len()).as_str()
    );
    let (status, _, body) = raw(
        &node,
        reqwest::Method::GET,
        &file_url,
        &[("if-none-match", &etag)],
        None,
    );
    assert_eq!((status, body.len()), (304, 0));
    // Unknown and malformed hashes.
    let unknown = format!("/v1/files/{}", "0".repeat(64));
    assert_eq!(raw(&node, reqwest::Method::GET, &unknown, &[], None).0, 404);
    assert_eq!(
        raw(&node, reqwest::Method::GET, "/v1/files/xyz", &[], None).0,
        400
    );

    // An upload over HTTP needs its media type, and answers with the hash.
    let small = b"a second file".to_vec();
    let (status, _, _) = raw(
        &node,
        reqwest::Method::POST,
        "/v1/files",
        &[("content-type", "application/json")],
        Some(small.clone()),
    );
    assert_eq!(status, 415);
    let (status, _, body) = raw(
        &node,
        reqwest::Method::POST,
        "/v1/files",
        &[("content-type", "application/octet-stream")],
        Some(small.clone()),
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let second: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(second["size"], json!(small.len()));

    // A field refers to a file: stored first, then the change.
    let out = node.ok(&[
        "put",
        "Sample",
        "S-1",
        r#"{"status": "analysed"}"#,
        "--file",
        &format!("report={}", path.display()),
    ]);
    assert!(out.contains(&hash), "{out}");
    assert_eq!(
        node.get("Sample", "S-1").unwrap(),
        json!({"status": "analysed", "report": {"$file": hash, "size": bytes.len(), "name": "report.pdf", "type": "application/pdf"}})
    );
    // A malformed reference is refused, and nothing is written.
    let bad = node.cli(&[
        "put",
        "Sample",
        "S-2",
        r#"{"r": {"$file": "xyz", "size": 1}}"#,
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a file hash"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(node.get("Sample", "S-2").is_none());

    // Read back by the CLI from the running node, listed, and nothing half-written left.
    let copy = dir.path().join("copy.pdf");
    node.ok(&["file", "get", &hash, "--out", copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == bytes);
    let listed = json(&node.ok(&["file", "ls", "--json"]));
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let partial = node.home().join("files").join("partial");
    assert_eq!(std::fs::read_dir(&partial).unwrap().count(), 0);

    // On the stopped node, from its store; then again from the restarted node.
    node.stop();
    let again = dir.path().join("again.pdf");
    node.ok(&["file", "get", &hash, "--out", again.to_str().unwrap()]);
    assert!(std::fs::read(&again).unwrap() == bytes);
    assert!(node.ok(&["file", "ls"]).contains(&hash));
    let missing = node.cli(&[
        "file",
        "get",
        &"1".repeat(64),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(3), "a file not stored exits 3");
    node.start();
    let (status, _, body) = raw(&node, reqwest::Method::GET, &file_url, &[], None);
    assert_eq!(status, 200);
    assert!(body == bytes);
}

// Regression (2026-12-07): `tidesync file get HASH --out /dev/null`, run as root, wrote the
// file to a temporary file and renamed it over `/dev/null`, which became a regular file that
// every later `> /dev/null` appended to and every reader of `/dev/null` read back (it broke
// the next `cargo test`'s compiler probe on this machine). A device or a pipe named as the
// output is now written into, on a running node (through the API) and on a stopped one; a
// regular file is still replaced atomically. A FIFO stands in for the device here.
#[test]
fn file_get_writes_into_a_pipe_or_device_instead_of_replacing_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::init("lab");
    let bytes = content(300_000, 3);
    let path = dir.path().join("report.pdf");
    std::fs::write(&path, &bytes).unwrap();
    let added = json(&node.ok(&["file", "add", path.to_str().unwrap()]));
    let hash = added["hash"].as_str().unwrap().to_string();
    for running in [false, true] {
        if running {
            node.start();
        }
        let fifo = dir.path().join(format!("pipe-{running}"));
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let fifo = fifo.clone();
            std::thread::spawn(move || tx.send(std::fs::read(fifo).unwrap()));
        }
        node.ok(&["file", "get", &hash, "--out", fifo.to_str().unwrap()]);
        let kind = std::fs::metadata(&fifo).unwrap().file_type();
        assert!(
            std::os::unix::fs::FileTypeExt::is_fifo(&kind),
            "the pipe is still a pipe (running: {running})"
        );
        let read = rx.recv_timeout(Duration::from_secs(60));
        assert_eq!(read.ok(), Some(bytes.clone()), "running: {running}");
        let copy = dir.path().join(format!("copy-{running}"));
        node.ok(&["file", "get", &hash, "--out", copy.to_str().unwrap()]);
        assert_eq!(std::fs::read(&copy).unwrap(), bytes);
    }
    node.stop();
}
