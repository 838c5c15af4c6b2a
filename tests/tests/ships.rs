//! Ships: export bundles carried between real node processes, alone and mixed with network
//! sync, and every kind of bad bundle refused whole.

use std::time::Duration;

use serde_json::{Value, json};
use tidesync_tests::{TestNode, json, noise, wait_for};

fn put(n: &TestNode, id: &str, body: &str) {
    n.ok(&["put", "Sample", id, body]);
}

/// What a node's store holds: its change feed, its object counts, held changes and what it
/// knows of its peers.
fn held(n: &TestNode) -> (String, serde_json::Value) {
    let mut status = json(&n.ok(&["status", "--json"]));
    let feed = n.ok(&["changes", "--since", "0"]);
    let keep = |k: &str| ["objects", "last_seq", "held_changes", "peers"].contains(&k);
    if let Some(m) = status.as_object_mut() {
        m.retain(|k, _| keep(k));
    }
    (feed, status)
}

fn out_path(n: &TestNode, file: &str) -> String {
    n.home()
        .parent()
        .expect("home has a parent")
        .join(file)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_voyage_bundle_carries_the_ships_work_and_the_next_sync_sends_only_the_rest() {
    let mut ship = TestNode::init("ship");
    let mut hub = TestNode::init("hub");
    ship.start();
    hub.start();
    ship.add_peer(&hub, true);
    hub.add_peer(&ship, false);
    put(&ship, "S-shared", r#"{"station":"A1"}"#);
    wait_for("the hub holds the shared sample", || {
        hub.get("Sample", "S-shared").is_some()
    });

    // The ship sails: it stops, and both sides work on their own, on the same object too.
    ship.stop();
    put(&hub, "S-shared", r#"{"checked_by":"hub"}"#);
    put(&hub, "H-1", r#"{"from":"hub"}"#);
    put(&ship, "S-shared", r#"{"depth":120}"#);
    for i in 0..10 {
        put(
            &ship,
            &format!("S-{i}"),
            &format!(r#"{{"i":{i},"note":"voyage"}}"#),
        );
    }

    // Ashore: the stopped ship exports, the running hub imports (a dry run first).
    let bundle = out_path(&ship, "voyage-12.tsb");
    let exported = json(&ship.ok(&["export", "--for", "hub", "--out", &bundle, "--json"]));
    assert_eq!(
        exported["changes"],
        json!(11),
        "10 new samples and the edit"
    );
    assert_eq!(exported["encrypted"], json!(true));
    let raw = std::fs::read(&bundle).unwrap();
    assert!(
        !raw.windows(6).any(|w| w == b"voyage"),
        "an encrypted bundle shows no field value"
    );
    let seq_before = hub.status()["last_seq"].clone();
    let dry = json(&hub.ok(&["import", "--dry-run", "--json", &bundle]));
    assert_eq!(
        (dry["added"].clone(), dry["updated"].clone()),
        (json!(10), json!(1))
    );
    assert_eq!(
        hub.status()["last_seq"],
        seq_before,
        "a dry run writes nothing"
    );
    let imported = json(&hub.ok(&["import", "--json", &bundle]));
    assert_eq!(
        imported,
        json!({
            "peer": "ship", "from": ship.id(), "dry_run": false, "added": 10, "updated": 1,
            "new_changes": 11,
            "duplicates": 0, "rejected": 0, "held": 0,
            "files": 0, "files_stored": 0, "file_bytes_stored": 0
        })
    );
    let shared = hub.get("Sample", "S-shared").unwrap();
    assert_eq!(
        (shared["depth"].clone(), shared["checked_by"].clone()),
        (json!(120), json!("hub")),
        "both sides' edits of the shared sample survive"
    );
    // The same bundle again changes nothing.
    let seq = hub.status()["last_seq"].clone();
    let again = json(&hub.ok(&["import", "--json", &bundle]));
    assert_eq!(
        (again["new_changes"].clone(), again["duplicates"].clone()),
        (json!(0), json!(11))
    );
    assert_eq!(hub.status()["last_seq"], seq);
    let in_before = hub.peer("ship")["changes_in"].clone();

    // Back in range: they converge, and only what the bundle did not carry crosses.
    ship.start();
    wait_for("the ship gets the hub's work", || {
        ship.get("Sample", "H-1").is_some()
            && ship
                .get("Sample", "S-shared")
                .is_some_and(|v| v["checked_by"] == json!("hub"))
    });
    wait_for("both are in sync", || {
        ship.peer("hub")["pending_out"] == json!(0) && hub.peer("ship")["pending_out"] == json!(0)
    });
    assert_eq!(
        ship.get("Sample", "S-shared"),
        hub.get("Sample", "S-shared"),
        "the same JSON on both"
    );
    let after = hub.peer("ship");
    assert_eq!(
        after["changes_in"], in_before,
        "no change the bundle carried was sent again"
    );
    assert_eq!(after["duplicates"], json!(0));
    // A running node exports too (through its API); the ship already has it all.
    let back = out_path(&hub, "back.tsb");
    let report = json(&hub.ok(&["export", "--for", "ship", "--all", "--out", &back, "--json"]));
    assert!(report["changes"].as_u64().unwrap() >= 2, "{report}");
    let imported = json(&ship.ok(&["import", "--json", &back]));
    assert_eq!(imported["new_changes"], json!(0), "{imported}");
}

#[test]
fn bad_bundles_are_refused_whole_and_leave_the_store_as_it_was() {
    let ship = TestNode::init("ship");
    let hub = TestNode::init("hub");
    let lab = TestNode::init("lab");
    ship.add_peer(&hub, false);
    hub.add_peer(&ship, false);
    lab.add_peer(&ship, false);
    put(
        &ship,
        "S-1",
        r#"{"depth":5,"password_hash":"not-for-strangers"}"#,
    );
    let bundle = out_path(&ship, "ok.tsb");
    ship.ok(&["export", "--for", "hub", "--out", &bundle]);
    let plain = out_path(&ship, "plain.tsb");
    ship.ok(&["export", "--for", "hub", "--out", &plain, "--plain"]);
    let good = std::fs::read(&bundle).unwrap();
    let good_plain = std::fs::read(&plain).unwrap();

    let mut flipped = good.clone();
    let at = good.len() - 20;
    flipped[at] ^= 0x40;
    // A plain bundle can be read, but not changed: any byte altered breaks its signature.
    assert!(good_plain.windows(5).any(|w| w == b"depth"));
    let mut tampered = good_plain.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupt", flipped, "damaged"),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("tampered", tampered, "damaged or was altered"),
        (
            "not a bundle",
            b"PK\x03\x04 a zip file".to_vec(),
            "not a tidesync bundle",
        ),
        ("empty", Vec::new(), "not a tidesync bundle"),
    ];
    // Every open of a redb file rewrites its header, so what must not change is what the
    // store holds: its log, its objects and what it knows of the ship.
    let before = held(&hub);
    for (what, bytes, says) in &cases {
        let file = out_path(&hub, "bad.tsb");
        std::fs::write(&file, bytes).unwrap();
        let out = hub.cli(&["import", &file]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} bundle was accepted");
        assert!(err.contains(says), "{what}: {err}");
        assert_eq!(held(&hub), before, "{what} changed the store");
    }
    // A bundle for the hub, at another node that knows the ship.
    let lab_before = held(&lab);
    let out = lab.cli(&["import", &bundle]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not for this node"),
        "{err}"
    );
    assert_eq!(held(&lab), lab_before, "the lab's store changed");
    // From a node that is not a configured peer: the lab exports for the ship... at the hub.
    let stranger = out_path(&lab, "stranger.tsb");
    lab.ok(&["export", "--for", "ship", "--out", &stranger]);
    let out = ship.cli(&["import", &stranger]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("not a configured peer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the good one still imports.
    let report = json(&hub.ok(&["import", "--json", &bundle]));
    assert_eq!(report["added"], json!(1));
}

#[test]
fn a_large_sync_over_a_link_that_keeps_breaking_completes_by_resuming() {
    const OBJECTS: usize = 20_000;
    let mut ship = TestNode::init("ship");
    let mut hub = TestNode::init("hub");
    hub.start();
    ship.start();
    let mut i = 0;
    while i < OBJECTS {
        let end = (i + 2_000).min(OBJECTS);
        let items: Vec<serde_json::Value> = (i..end)
            .map(|k| json!({"type": "Sample", "id": format!("S-{k:05}"), "fields": {"k": k, "pad": noise(k as u64, 160)}}))
            .collect();
        let (status, body) = hub.http(
            reqwest::Method::POST,
            "/v1/objects",
            Some(&serde_json::Value::Array(items).to_string()),
        );
        assert_eq!(status, 200, "{body}");
        i = end;
    }
    // The ship reaches the hub only through a link that drops every 1.5 MiB: less than the
    // whole sync, more than the two batches in flight, so each connection gets further.
    let (proxy, from_hub) = sync_through_cuts(&hub, &ship, 1536 * 1024, OBJECTS);
    assert!(
        proxy.cuts() >= 2,
        "the link never broke ({} connections)",
        proxy.connections()
    );
    // Resuming, not restarting: at most the batches in flight at each cut come again.
    let resent = from_hub["duplicates"].as_u64().unwrap();
    assert!(
        resent <= proxy.cuts() * 2 * 2_000,
        "{resent} changes resent over {} cuts",
        proxy.cuts()
    );
    ship.stop();
    hub.stop();
}

// Regression: on a link that dropped every few hundred KiB, every 8 MiB batch was cut midway
// and two of them interleaved on Yamux, so a sync needed a connection per few objects or never
// finished. The sender now shrinks its batches and window after each failed batch (see
// `tidesync::sync::pace`), so records of ordinary size cross a link that drops every 64 KiB.
#[test]
fn records_cross_a_link_that_drops_every_64_kib() {
    const OBJECTS: usize = 400;
    let mut ship = TestNode::init("ship");
    let mut hub = TestNode::init("hub");
    hub.start();
    ship.start();
    let items: Vec<serde_json::Value> = (0..OBJECTS)
        .map(|k| json!({"type": "Sample", "id": format!("S-{k:04}"), "fields": {"k": k, "notes": noise(k as u64, 2_000)}}))
        .collect();
    let (status, body) = hub.http(
        reqwest::Method::POST,
        "/v1/objects",
        Some(&serde_json::Value::Array(items).to_string()),
    );
    assert_eq!(status, 200, "{body}");
    let (proxy, _) = sync_through_cuts(&hub, &ship, 64 * 1024, OBJECTS);
    assert!(
        proxy.cuts() >= 5,
        "the link broke only {} times",
        proxy.cuts()
    );
    ship.stop();
    hub.stop();
}

/// A window starting `from_h` hours from now and lasting an hour, as `HH:MM-HH:MM` UTC.
fn window_from_now(from_h: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let minute = |secs: u64| (secs / 60) % (24 * 60);
    let (a, b) = (
        minute(now + from_h * 3600),
        minute(now + (from_h + 1) * 3600),
    );
    format!("{:02}:{:02}-{:02}:{:02}", a / 60, a % 60, b / 60, b % 60)
}

#[test]
fn windows_budgets_and_sync_now_decide_what_the_link_carries() {
    let mut ship = TestNode::init("ship");
    let mut hub = TestNode::init("hub");
    hub.start();
    ship.start();
    let put = |n: &TestNode, from: usize, to: usize| {
        let items: Vec<serde_json::Value> = (from..to)
            .map(|k| json!({"type": "Sample", "id": format!("S-{k:03}"), "fields": {"k": k, "pad": noise(k as u64, 1_400)}}))
            .collect();
        let (status, body) = n.http(
            reqwest::Method::POST,
            "/v1/objects",
            Some(&serde_json::Value::Array(items).to_string()),
        );
        assert_eq!(status, 200, "{body}");
    };
    put(&hub, 0, 50);
    // The hub may send to the ship only in a window two hours from now, and 20 kB a day.
    let window = window_from_now(2);
    hub.add_peer_with(&ship, false, &["--window", &window, "--budget", "20000"]);
    ship.add_peer(&hub, true);
    wait_for("the ship is connected", || {
        hub.peer("ship")["connected"] == true
    });
    wait_for("the hub says why it holds back", || {
        hub.peer("ship")["held_back"]
            .as_str()
            .is_some_and(|h| h.contains("outside its sync windows"))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ship.status()["objects"]["Sample"],
        Value::Null,
        "nothing crossed outside the window"
    );
    // The plan says what the window holds back, and what it costs.
    let plan = json(&hub.ok(&["plan", "--for", "ship", "--json"]));
    assert_eq!(plan["changes"], json!(50), "{plan}");
    assert_eq!(plan["objects"], json!(50), "{plan}");
    assert_eq!(plan["types"]["Sample"]["changes"], json!(50), "{plan}");
    let bytes = plan["bytes"].as_u64().unwrap();
    assert!(bytes > 50_000, "{plan}");
    // 20 kB a day from today on.
    assert_eq!(plan["days"], json!(bytes.div_ceil(20_000)), "{plan}");
    assert!(plan["held_back"]["reason"] == "outside-window", "{plan}");
    let text = hub.ok(&["export", "--for", "ship", "--plan"]);
    assert!(text.contains("50 changes of 50 objects"), "{text}");
    // The operator overrides it once.
    let said = hub.ok(&["sync", "--now", "ship"]);
    assert!(said.contains("sending to ship now"), "{said}");
    wait_for("the ship holds the 50 samples", || {
        ship.status()["objects"]["Sample"]["live"] == json!(50)
    });
    let sent = hub.peer("ship")["sent_today"].as_u64().unwrap();
    assert!(
        sent > 50_000,
        "the override's bytes count against today's budget: {sent}"
    );
    // Without windows, the spent budget holds back what comes next, and says so.
    hub.ok(&["peer", "set", "ship", "--window", "none"]);
    put(&hub, 50, 60);
    wait_for("the hub says the budget is spent", || {
        hub.peer("ship")["held_back"]
            .as_str()
            .is_some_and(|h| h.contains("daily budget is spent"))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ship.status()["objects"]["Sample"]["live"], json!(50));
    // The meter survives a restart; the plan reads a stopped node's store too.
    hub.stop();
    let plan = json(&hub.ok(&["plan", "--for", "ship", "--json"]));
    assert_eq!(plan["changes"], json!(10), "{plan}");
    assert_eq!(plan["held_back"]["reason"], "budget-spent", "{plan}");
    hub.start();
    let after = hub.peer("ship")["sent_today"].as_u64().unwrap();
    assert!(after >= sent, "{after} < {sent}");
    ship.stop();
    hub.stop();
}

#[test]
fn imagery_never_spends_the_budget_the_records_need() {
    let dir = tempfile::tempdir().unwrap();
    let mut ship = TestNode::init("ship");
    let mut hub = TestNode::init("hub");
    hub.start();
    ship.start();
    let image = dir.path().join("image.tif");
    std::fs::write(&image, tidesync_tests::content(4 << 20, 7)).unwrap();
    hub.ok(&[
        "put",
        "Volume",
        "V-1",
        r#"{"kind":"mosaic"}"#,
        "--file",
        &format!("image={}", image.display()),
    ]);
    for k in 0..10 {
        put(&hub, &format!("S-{k:02}"), &format!(r#"{{"k":{k}}}"#));
    }
    // 3 MB a day to the ship: files may spend 80 % of it.
    hub.add_peer_with(&ship, false, &["--budget", "3000000"]);
    let plan = json(&hub.ok(&["plan", "--for", "ship", "--json"]));
    assert_eq!(plan["changes"], json!(11), "{plan}");
    assert_eq!(plan["files"], json!(1), "{plan}");
    assert_eq!(plan["file_bytes"], json!(4 << 20), "{plan}");
    assert_eq!(plan["days"], json!(2), "{plan}");
    ship.add_peer(&hub, true);
    wait_for("the ship holds the records", || {
        ship.status()["objects"]["Sample"]["live"] == json!(10)
            && ship.status()["objects"]["Volume"]["live"] == json!(1)
    });
    wait_for("two segments of the image cross", || {
        hub.peer("ship")["sent_today"].as_u64().unwrap() > 2_000_000
    });
    std::thread::sleep(Duration::from_secs(3));
    let spent = hub.peer("ship")["sent_today"].as_u64().unwrap();
    assert!(
        spent <= 2_400_000,
        "files stop at 80 % of the budget: {spent}"
    );
    assert_eq!(
        json(&ship.ok(&["file", "ls", "--missing", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        1,
        "the rest of the image waits for tomorrow"
    );
    // Records written after the imagery still cross today.
    for k in 10..30 {
        put(
            &hub,
            &format!("S-{k:02}"),
            &format!(r#"{{"k":{k},"pad":"{}"}}"#, "z".repeat(500)),
        );
    }
    wait_for("the new records cross", || {
        ship.status()["objects"]["Sample"]["live"] == json!(30)
    });
    let spent = hub.peer("ship")["sent_today"].as_u64().unwrap();
    assert!(spent <= 3_000_000, "within the day's budget: {spent}");
    ship.stop();
    hub.stop();
}

/// Peer `ship` with `hub` through a proxy that cuts every connection after `cut_bytes`, and
/// wait until the ship holds `objects` samples, each stored once; the proxy and the ship's
/// record of the hub.
fn sync_through_cuts(
    hub: &TestNode,
    ship: &TestNode,
    cut_bytes: u64,
    objects: usize,
) -> (tidesync_tests::proxy::FlakyProxy, Value) {
    let hub_addr = hub.listen_addr();
    let port: u16 = hub_addr.rsplit('/').next().unwrap().parse().unwrap();
    let proxy = tidesync_tests::proxy::FlakyProxy::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        cut_bytes,
    );
    let via = format!("/ip4/127.0.0.1/tcp/{}", proxy.addr().port());
    hub.add_peer(ship, false);
    ship.ok(&["peer", "add", "hub", "--id", &hub.id(), "--addr", &via]);
    wait_for("the ship holds every object", || {
        ship.status()["objects"]["Sample"]["live"] == json!(objects)
    });
    let from_hub = ship.peer("hub");
    eprintln!(
        "link cut every {cut_bytes} bytes: {} connections, {} cut midway, {} bytes; {} changes stored, {} came twice",
        proxy.connections(),
        proxy.cuts(),
        proxy.bytes(),
        from_hub["changes_in"],
        from_hub["duplicates"]
    );
    assert_eq!(
        from_hub["changes_in"],
        json!(objects),
        "each change stored once"
    );
    (proxy, from_hub)
}

#[test]
fn a_link_names_its_time_zone_and_an_unknown_one_is_refused() {
    let ship = TestNode::init("ship");
    let hub = TestNode::init("hub");
    // Windows in the ship's home port's local time, on a stopped node's config.
    hub.add_peer_with(
        &ship,
        false,
        &[
            "--window",
            "02:00-05:00",
            "--budget",
            "5000000",
            "--zone",
            "Pacific/Auckland",
        ],
    );
    let config = std::fs::read_to_string(hub.home().join("config.toml")).unwrap();
    assert!(config.contains(r#"zone = "Pacific/Auckland""#), "{config}");
    let format = format!("format = {}", tidesync::config::CONFIG_FORMAT);
    assert!(config.contains(&format), "{config}");
    let plan = hub.ok(&["plan", "--for", "ship"]);
    assert!(
        plan.contains("windows (Pacific/Auckland): 02:00-05:00"),
        "{plan}"
    );
    let out = hub.cli(&["peer", "set", "ship", "--zone", "Mars/Olympus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown time zone"),
        "{err}"
    );
    // Back to UTC.
    hub.ok(&["peer", "set", "ship", "--zone", "UTC"]);
    let plan = hub.ok(&["plan", "--for", "ship"]);
    assert!(plan.contains("windows (UTC): 02:00-05:00"), "{plan}");
}

#[test]
fn priority_types_cross_first_on_a_budgeted_link() {
    let mut hub = TestNode::init("hub");
    let mut ship = TestNode::init("ship");
    hub.start();
    ship.start();
    // A month of annotations (about 50 KB on the wire), then today's samples.
    for k in 0..80 {
        hub.ok(&[
            "put",
            "Annotation",
            &format!("A-{k:02}"),
            &format!(r#"{{"k":{k},"pad":"{}"}}"#, noise(k, 1_000)),
        ]);
    }
    for k in 0..3 {
        put(&hub, &format!("S-{k}"), &format!(r#"{{"k":{k}}}"#));
    }
    // 30 KB a day to the ship: not enough for the annotations.
    hub.add_peer_with(&ship, false, &["--budget", "30000", "--priority", "Sample"]);
    assert!(
        std::fs::read_to_string(hub.home().join("config.toml"))
            .unwrap()
            .contains(r#"priority = ["Sample"]"#)
    );
    ship.add_peer(&hub, true);
    wait_for("today's samples cross first", || {
        ship.status()["objects"]["Sample"]["live"] == json!(3)
    });
    wait_for("the day's budget binds", || {
        hub.peer("ship")["held_back"]
            .as_str()
            .is_some_and(|h| h.contains("budget"))
    });
    let annotations = ship.status()["objects"]["Annotation"]["live"]
        .as_u64()
        .unwrap_or(0);
    assert!(annotations < 80, "the budget binds: {annotations}");
    assert!(hub.peer("ship")["sent_today"].as_u64().unwrap() <= 30_000);
    // Nothing crossed twice.
    assert_eq!(
        ship.peer("hub")["duplicates"],
        json!(0),
        "{}",
        ship.peer("hub")
    );
}
