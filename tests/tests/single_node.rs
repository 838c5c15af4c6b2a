//! One real node process: the CLI (through the API and offline), the HTTP API, restarts,
//! the change feed, crash durability, and every kind of bad input.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use tidesync_tests::{TestNode, json};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The issue's quick start, run once against a stopped node (CLI opens the store) and once
/// against a running one (CLI goes through the API); both must print the same things.
fn quick_start(node: &TestNode) -> Vec<String> {
    let mut seen = Vec::new();
    let put = json(&node.ok(&[
        "put",
        "Sample",
        "S-001",
        r#"{"status":"received","volume_ml":2.5}"#,
    ]));
    assert_eq!(put["changed"], json!(true));
    let out = node.cli_stdin(
        &["put", "Sample", "S-001", "-"],
        Some(r#"{"status":"analysed"}"#),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    seen.push(node.ok(&["get", "Sample", "S-001"]));
    assert_eq!(
        json(&seen[0]),
        json!({"status": "analysed", "volume_ml": 2.5})
    );
    node.ok(&["put", "Sample", "S-002", "{}"]);
    seen.push(node.ok(&["ls", "Sample"]));
    assert_eq!(seen[1], "S-001\nS-002\n");
    let history = json(&node.ok(&["history", "--json", "Sample", "S-001"]));
    let changes = history["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2);
    let id = node.ok(&["id"]).trim().to_string();
    for c in changes {
        assert_eq!(c["verified"], json!(true));
        assert_eq!(c["author"], json!(id));
    }
    let table = node.ok(&["history", "Sample", "S-001"]);
    assert_eq!(table.matches("signature verified").count(), 2, "{table}");
    node.ok(&["rm", "Sample", "S-001"]);
    let out = node.cli(&["get", "Sample", "S-001"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("Sample/S-001 does not exist"),
        "{}",
        stderr(&out)
    );
    seen.push(node.ok(&["ls", "Sample"]));
    let status = json(&node.ok(&["status", "--json"]));
    assert_eq!(
        status["objects"]["Sample"],
        json!({"live": 1, "deleted": 1})
    );
    assert_eq!(status["node"], json!(id));
    seen.push(status["last_seq"].to_string());
    seen
}

#[test]
fn cli_gives_the_same_results_offline_and_through_a_running_node() {
    let offline = TestNode::init("lab-a");
    let offline_seen = quick_start(&offline);
    assert!(
        !json(&offline.ok(&["status", "--json"]))["running"]
            .as_bool()
            .unwrap()
    );

    let mut online = TestNode::init("lab-b");
    online.start();
    let online_seen = quick_start(&online);
    assert!(
        json(&online.ok(&["status", "--json"]))["running"]
            .as_bool()
            .unwrap()
    );
    assert_eq!(offline_seen, online_seen);
    online.stop();
    // What the running node wrote is there when the CLI reads the store itself.
    assert_eq!(online.ok(&["ls", "Sample"]), "S-002\n");
}

#[test]
fn http_api_serves_every_operation() {
    let mut node = TestNode::init("lab-a");
    node.start();
    let (s, v) = node.http(
        Method::PUT,
        "/v1/objects/Sample/S-001",
        Some(r#"{"status":"received","volume_ml":2.5,"tags":["a"]}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["object"],
        json!({"status": "received", "volume_ml": 2.5, "tags": ["a"]})
    );
    // A PUT sets only what it names; null removes a field; an identical PUT changes nothing.
    let (s, v) = node.http(
        Method::PUT,
        "/v1/objects/Sample/S-001",
        Some(r#"{"volume_ml":null,"note":"x"}"#),
    );
    assert_eq!(s, 200, "{v}");
    let (_, v) = node.http(Method::GET, "/v1/objects/Sample/S-001", None);
    assert_eq!(v, json!({"status": "received", "tags": ["a"], "note": "x"}));
    let (_, v) = node.http(
        Method::PUT,
        "/v1/objects/Sample/S-001",
        Some(r#"{"note":"x"}"#),
    );
    assert_eq!(v["changed"], json!(false));
    // Ids with spaces and punctuation travel percent-encoded.
    let (s, _) = node.http(
        Method::PUT,
        "/v1/objects/Sample/S%20002%20(rerun)",
        Some("{}"),
    );
    assert_eq!(s, 200);
    for i in 0..5 {
        node.http(
            Method::PUT,
            &format!("/v1/objects/Method/M-{i}"),
            Some(r#"{"v":1}"#),
        );
    }
    // Paging through a type.
    let (_, page) = node.http(Method::GET, "/v1/objects/Method?limit=2", None);
    assert_eq!(page["ids"], json!(["M-0", "M-1"]));
    let (_, page) = node.http(
        Method::GET,
        &format!(
            "/v1/objects/Method?limit=2&after={}",
            page["next"].as_str().unwrap()
        ),
        None,
    );
    assert_eq!(page["ids"], json!(["M-2", "M-3"]));
    let (_, page) = node.http(Method::GET, "/v1/objects/Method?limit=2&after=M-3", None);
    assert_eq!(page, json!({"ids": ["M-4"], "next": null}));
    let (_, page) = node.http(Method::GET, "/v1/objects/Sample", None);
    assert_eq!(page["ids"], json!(["S 002 (rerun)", "S-001"]));
    // History, delete, 404s.
    let (_, h) = node.http(Method::GET, "/v1/objects/Sample/S-001/history", None);
    assert_eq!(h["changes"].as_array().unwrap().len(), 2);
    let (s, _) = node.http(Method::DELETE, "/v1/objects/Sample/S-001", None);
    assert_eq!(s, 200);
    assert_eq!(
        node.http(Method::GET, "/v1/objects/Sample/S-001", None).0,
        404
    );
    assert_eq!(
        node.http(Method::DELETE, "/v1/objects/Sample/S-001", None)
            .0,
        404
    );
    assert_eq!(
        node.http(Method::GET, "/v1/objects/Sample/nope", None).0,
        404
    );
    let (s, h) = node.http(Method::GET, "/v1/objects/Sample/S-001/history", None);
    assert_eq!((s, h["deleted"].clone()), (200, json!(true)));
    let (_, st) = node.http(Method::GET, "/v1/status", None);
    assert_eq!(st["name"], json!("lab-a"));
    assert!(st["store_bytes"].as_u64().unwrap() > 0);
    assert_eq!(st["objects"]["Method"]["live"], json!(5));
}

#[test]
fn bad_requests_get_4xx_and_change_nothing() {
    let mut node = TestNode::init("lab-a");
    node.start();
    node.http(Method::PUT, "/v1/objects/Sample/S-001", Some(r#"{"a":1}"#));
    let (_, before) = node.http(Method::GET, "/v1/status", None);
    let cases: &[(Method, &str, Option<&str>, u16, &str)] = &[
        (
            Method::PUT,
            "/v1/objects/Sample/S-001",
            Some("{not json"),
            400,
            "not valid JSON",
        ),
        (
            Method::PUT,
            "/v1/objects/Sample/S-001",
            Some("[1,2]"),
            400,
            "JSON object",
        ),
        (
            Method::PUT,
            "/v1/objects/Sample/S-001",
            Some(r#"{"@deleted":true}"#),
            400,
            "reserved",
        ),
        (
            Method::PUT,
            "/v1/objects/9bad/S-001",
            Some("{}"),
            400,
            "invalid type name",
        ),
        (Method::GET, "/v1/changes?since=abc", None, 400, ""),
        (Method::GET, "/v1/nope", None, 404, "no such endpoint"),
    ];
    for (method, path, body, want, text) in cases {
        let (s, v) = node.http(method.clone(), path, *body);
        assert_eq!(s, *want, "{method} {path}: {v}");
        assert!(
            v["error"].as_str().unwrap_or_default().contains(text),
            "{method} {path}: {v}"
        );
    }
    let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(5 * 1024 * 1024));
    assert_eq!(
        node.http(Method::PUT, "/v1/objects/Sample/S-big", Some(&big))
            .0,
        413
    );
    let (_, after) = node.http(Method::GET, "/v1/status", None);
    assert_eq!(before["last_seq"], after["last_seq"]);
    assert_eq!(
        node.http(Method::GET, "/v1/objects/Sample/S-001", None).1,
        json!({"a": 1})
    );
}

#[test]
fn the_generated_token_is_required_on_every_request() {
    let mut node = TestNode::init("lab-a");
    let token = node.token_file().expect("init writes a token file");
    let token = token.as_str();
    node.start();
    assert_eq!(node.http_with(Method::GET, "/v1/status", None, None).0, 401);
    assert_eq!(
        node.http_with(
            Method::GET,
            "/v1/status",
            None,
            Some("wrong-token-wrong-token")
        )
        .0,
        401
    );
    assert_eq!(
        node.http_with(Method::PUT, "/v1/objects/S/x", Some("{}"), None)
            .0,
        401
    );
    assert_eq!(
        node.http_with(Method::GET, "/v1/status", None, Some(token))
            .0,
        200
    );
    // The CLI reads the token from the token file.
    node.ok(&["put", "Sample", "S-1", r#"{"a":1}"#]);
    assert_eq!(json(&node.ok(&["get", "Sample", "S-1"])), json!({"a": 1}));
}

#[test]
fn init_no_longer_takes_a_token_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("n");
    let out = std::process::Command::new(tidesync_tests::tidesync_bin())
        .args([
            "init",
            "--api-token",
            "a-secret-token-of-some-length",
            "--home",
        ])
        .arg(&home)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--api-token"), "{}", stderr(&out));
    assert!(!home.join("config.toml").exists());
}

#[test]
fn data_survives_a_restart_and_the_feed_resumes_from_any_seq() {
    let mut node = TestNode::init("lab-a");
    node.start();
    for i in 1..=5 {
        node.ok(&[
            "put",
            "Sample",
            &format!("S-{i}"),
            &format!(r#"{{"n":{i}}}"#),
        ]);
    }
    node.stop();
    node.start();
    assert_eq!(json(&node.ok(&["get", "Sample", "S-3"])), json!({"n": 3}));
    let (_, feed) = node.http(Method::GET, "/v1/changes?since=2", None);
    let seqs: Vec<u64> = feed["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    assert_eq!(feed["last"], json!(5));
    assert_eq!(feed["changes"][0]["id"], json!("S-3"));
    // The CLI's feed matches the API's.
    let lines = node.ok(&["changes", "--since", "4"]);
    assert_eq!(json(lines.lines().next().unwrap())["seq"], json!(5));

    // A long-poll with nothing new returns when the next change is stored.
    let url_node = Arc::new(node);
    let poller = {
        let n = Arc::clone(&url_node);
        std::thread::spawn(move || n.http(Method::GET, "/v1/changes?since=5&wait=30", None))
    };
    std::thread::sleep(Duration::from_millis(300));
    url_node.ok(&["put", "Sample", "S-6", r#"{"n":6}"#]);
    let (s, feed) = poller.join().unwrap();
    assert_eq!(s, 200);
    assert_eq!(feed["changes"][0]["seq"], json!(6), "{feed}");
    assert_eq!(feed["changes"][0]["id"], json!("S-6"));
}

/// Concurrent writers, so that the node commits their writes in groups (group commit).
const KILL_WRITERS: u64 = 8;

#[test]
fn every_acknowledged_put_survives_kill_9() {
    let mut node = TestNode::init("lab-a");
    node.start();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let base = node.api_url();
    let token = node.token().expect("a token").to_string();
    let writers: Vec<_> = (0..KILL_WRITERS)
        .map(|w| {
            let (acked, base, token) = (Arc::clone(&acked), base.clone(), token.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .no_proxy()
                    .build()
                    .unwrap();
                for i in 0.. {
                    // Ids interleave across writers: writer w writes w, w + 8, w + 16, ...
                    let n = i * KILL_WRITERS + w;
                    let r = client
                        .put(format!("{base}/v1/objects/Sample/S-{n}"))
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(format!(r#"{{"n":{n}}}"#))
                        .send();
                    match r {
                        Ok(resp) if resp.status().is_success() => {
                            acked.lock().unwrap().insert(n);
                        }
                        _ => return n,
                    }
                }
                unreachable!()
            })
        })
        .collect();
    while acked.lock().unwrap().len() < 400 {
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "a writer stopped before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = node.signal("KILL");
    assert!(!status.success());
    let stopped_at: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 400);
    // The store opens again after the crash, and every acknowledged write is in it.
    node.start();
    let listed = node.ok(&["ls", "Sample"]);
    let present: BTreeSet<u64> = listed
        .lines()
        .map(|l| l.trim_start_matches("S-").parse().unwrap())
        .collect();
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost after kill -9: {lost:?} (writers stopped at {stopped_at:?})"
    );
    for i in acked.iter().take(5) {
        assert_eq!(
            json(&node.ok(&["get", "Sample", &format!("S-{i}")])),
            json!({"n": i})
        );
    }
}

#[test]
fn a_second_node_on_the_same_home_is_refused() {
    let mut node = TestNode::init("lab-a");
    node.start();
    let out = node.cli(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));
    // The first node is unharmed.
    node.ok(&["put", "Sample", "S-1", "{}"]);
}

#[test]
fn bad_command_lines_say_what_is_wrong() {
    let node = TestNode::init("lab-a");
    let out = node.cli(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unrecognized subcommand"),
        "{}",
        stderr(&out)
    );

    let out = std::process::Command::new(tidesync_tests::tidesync_bin())
        .args(["get", "Sample", "S-1"])
        .env_remove("TIDESYNC_HOME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--home"), "{}", stderr(&out));

    let out = std::process::Command::new(tidesync_tests::tidesync_bin())
        .args([
            "get",
            "--home",
            "/nonexistent/tidesync-home",
            "Sample",
            "S-1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("tidesync init"), "{}", stderr(&out));

    for (args, text) in [
        (vec!["put", "Sample", "S-1", "{oops"], "not valid JSON"),
        (vec!["put", "Sample", "S-1", "42"], "JSON object"),
        (vec!["put", "bad-type", "S-1", "{}"], "invalid type name"),
        (vec!["put", "Sample", "a/b", "{}"], "invalid object id"),
    ] {
        let out = node.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(text), "{args:?}: {}", stderr(&out));
    }
    let out = node.cli(&["init"]);
    assert!(
        stderr(&out).contains("already holds a tidesync node"),
        "{}",
        stderr(&out)
    );
    assert_eq!(node.ok(&["ls", "Sample"]), "");
}

#[test]
fn damaged_store_key_and_config_files_are_reported_and_left_alone() {
    let node = TestNode::init("lab-a");
    node.ok(&["put", "Sample", "S-1", r#"{"a":1}"#]);
    let home = node.home();

    // A truncated store.
    let store = home.join("store.redb");
    let original = std::fs::read(&store).unwrap();
    std::fs::write(&store, &original[..original.len() / 3]).unwrap();
    let truncated = std::fs::read(&store).unwrap();
    let out = node.cli(&["get", "Sample", "S-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("store.redb"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&store).unwrap(),
        truncated,
        "a damaged store must not be modified"
    );
    // A store overwritten with garbage.
    std::fs::write(&store, vec![0xA5u8; original.len()]).unwrap();
    let out = node.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("store.redb"), "{}", stderr(&out));
    let n2 = TestNode::init("lab-b");
    std::fs::write(n2.home().join("store.redb"), vec![0xA5u8; 4096]).unwrap();
    let out = n2.cli(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("store.redb"), "{}", stderr(&out));

    // Restored, it works again.
    std::fs::write(&store, &original).unwrap();
    assert_eq!(json(&node.ok(&["get", "Sample", "S-1"])), json!({"a": 1}));

    // An unreadable key file.
    let key = home.join("identity.key");
    let key_bytes = std::fs::read(&key).unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let out = node.cli(&["id"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("identity.key"), "{}", stderr(&out));
    std::fs::write(&key, &key_bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = node.cli(&["get", "Sample", "S-1"]);
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A broken config file.
    let config = home.join("config.toml");
    let config_text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, "name = [\n").unwrap();
    let out = node.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("config.toml"), "{}", stderr(&out));
    std::fs::write(&config, config_text).unwrap();
    assert_eq!(json(&node.ok(&["get", "Sample", "S-1"])), json!({"a": 1}));
}
