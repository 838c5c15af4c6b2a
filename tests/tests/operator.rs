//! The operator's view on real node processes: the conflicts inbox across three nodes (a
//! resolution is an ordinary change that empties the inbox everywhere), the refusal log,
//! `/metrics` read by a real Prometheus text parser, `/healthz` and `/readyz`, and the status
//! page in a real headless Chromium.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tidesync_tests::browser::{Browser, artifact_dir};
use tidesync_tests::{TestNode, wait_for};

/// Start `names` as running nodes, every pair peered and dialing each other, and wait until
/// each is connected to all the others.
fn mesh(names: &[&str]) -> Vec<TestNode> {
    let mut nodes: Vec<TestNode> = names.iter().map(|n| TestNode::init(n)).collect();
    for n in &mut nodes {
        n.start();
    }
    for i in 0..nodes.len() {
        for j in 0..nodes.len() {
            if i != j {
                nodes[i].add_peer(&nodes[j], true);
            }
        }
    }
    wait_connected(&nodes);
    nodes
}

fn wait_connected(nodes: &[TestNode]) {
    for n in nodes {
        let others: Vec<&str> = nodes
            .iter()
            .filter(|o| o.name != n.name)
            .map(|o| o.name.as_str())
            .collect();
        wait_for(&format!("{} connected to {others:?}", n.name), || {
            others.iter().all(|o| n.peer(o)["connected"] == true)
        });
    }
}

/// The node's inbox items of `kind`.
fn inbox(node: &TestNode, kind: &str) -> Vec<Value> {
    let (code, v) = node.http(reqwest::Method::GET, "/v1/conflicts", None);
    assert_eq!(code, 200, "{v}");
    v.as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .filter(|c| c["kind"] == kind)
        .cloned()
        .collect()
}

/// Write `status` on each of `writers` while it is the only node running, so that the writes
/// are concurrent; then start every node again.
fn write_concurrently(nodes: &mut [TestNode], writers: &[(usize, &str)]) {
    for n in nodes.iter_mut() {
        n.stop();
    }
    for (i, status) in writers {
        // A stopped node's CLI writes to its store directly: a real signed change.
        nodes[*i].ok(&[
            "put",
            "Sample",
            "S-001",
            &format!(r#"{{"status":"{status}","meta":{{"lab":"{status}"}}}}"#),
        ]);
    }
    for n in nodes.iter_mut() {
        n.start();
    }
    // Each listens on a new ephemeral port now: tell the others where.
    for n in nodes.iter() {
        for o in nodes.iter().filter(|o| o.name != n.name) {
            let body = serde_json::json!({"id": o.id(), "addrs": [o.listen_addr()]}).to_string();
            let (code, v) = n.http(
                reqwest::Method::PUT,
                &format!("/v1/peers/{}", o.name),
                Some(&body),
            );
            assert!((200..300).contains(&code), "{v}");
        }
    }
    wait_connected(nodes);
}

/// A mesh of `names` in which the first two wrote `Sample/S-001`'s `status` and `meta/lab`
/// concurrently (`done` and `failed`), every node holding both.
fn conflicted_mesh(names: &[&str]) -> Vec<TestNode> {
    let mut nodes = mesh(names);
    nodes[0].ok(&[
        "put",
        "Sample",
        "S-001",
        r#"{"status":"new","meta":{"lab":"new"}}"#,
    ]);
    for n in &nodes {
        wait_for(&format!("{} has S-001", n.name), || {
            n.get("Sample", "S-001").is_some()
        });
    }
    write_concurrently(&mut nodes, &[(0, "done"), (1, "failed")]);
    nodes
}

#[test]
fn concurrent_values_are_listed_everywhere_and_one_resolution_clears_them_everywhere() {
    let mut nodes = conflicted_mesh(&["lab-a", "lab-b", "hub"]);
    let ids: Vec<String> = nodes.iter().map(|n| n.id()).collect();
    for n in &nodes {
        wait_for(&format!("{} lists both values of status", n.name), || {
            let items = inbox(n, "fields");
            items.len() == 1 && items[0]["fields"].as_array().is_some_and(|f| f.len() == 2)
        });
        let item = &inbox(n, "fields")[0];
        assert_eq!(
            (item["type"].as_str(), item["local_id"].as_str()),
            (Some("Sample"), Some("S-001"))
        );
        let status = item["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == "status")
            .unwrap_or_else(|| panic!("{item}"));
        let mut values: Vec<(String, String)> = status["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["value"].as_str().unwrap().to_string(),
                    v["author"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        values.sort();
        assert_eq!(
            values,
            vec![
                ("done".into(), ids[0].clone()),
                ("failed".into(), ids[1].clone())
            ],
            "every value with the node that wrote it"
        );
        assert!(
            item["fields"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["path"] == "meta/lab")
        );
        assert_eq!(n.status()["concurrent_fields"], 2, "{}", n.name);
        let text = n.ok(&["conflicts"]);
        assert!(
            text.contains("status:") && text.contains("\"failed\"") && text.contains("value id"),
            "{text}"
        );
    }
    // Resolve on the hub, which wrote neither value, keeping the value that reads do not show
    // there, so that the resolution is visible wherever it arrives.
    let hub = &nodes[2];
    let item = &inbox(hub, "fields")[0];
    let field = item["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "status")
        .unwrap();
    let loser = field["values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["winner"] == false)
        .unwrap();
    let keep = loser["value"].as_str().unwrap().to_string();
    let pick = loser["id"].as_str().unwrap();
    hub.ok(&["resolve", "Sample", "S-001", "status", "--pick", pick]);
    // A pick that is no longer one of the concurrent values is refused.
    let out = hub.cli(&["resolve", "Sample", "S-001", "status", "--pick", pick]);
    assert!(
        !out.status.success(),
        "a second resolution of the same field must be refused"
    );
    // meta/lab is resolved through the API, by its nested path.
    let lab = item["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "meta/lab")
        .unwrap();
    let body = serde_json::json!({"path": "meta/lab", "pick": lab["values"][0]["id"]}).to_string();
    let (code, v) = hub.http(
        reqwest::Method::POST,
        "/v1/objects/Sample/S-001/resolve",
        Some(&body),
    );
    assert_eq!(code, 200, "{v}");
    for n in &nodes {
        wait_for(&format!("the resolution reaches {}", n.name), || {
            inbox(n, "fields").is_empty()
                && n.get("Sample", "S-001")
                    .is_some_and(|o| o["status"] == keep.as_str())
        });
        assert_eq!(n.status()["concurrent_fields"], 0);
    }
    // The inbox index survives a restart: still empty, and the object reads the same.
    nodes[0].stop();
    assert!(nodes[0].ok(&["conflicts", "--json"]).trim() == "[]");
}

/// Parse OpenMetrics text with Debian's python3-prometheus-client (a real, strict parser);
/// one `[family, type, sample, {labels}, value]` per sample. Every family must have HELP.
fn parse_metrics(text: &str) -> Vec<Value> {
    const SCRIPT: &str = r#"
import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for f in text_string_to_metric_families(sys.stdin.read()):
    assert f.documentation, "no HELP for " + f.name
    for s in f.samples:
        print(json.dumps([f.name, f.type, s.name, s.labels, s.value]))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("Debian's python3 with python3-prometheus-client (.ci/run installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the metrics do not parse: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The value of the sample `sample` whose labels include `labels`, if there is one.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s[2] == name && labels.iter().all(|(k, v)| s[3][*k] == *v))
        .and_then(|s| s[4].as_f64())
}

/// A GET with no token at all.
fn get_plain(node: &TestNode, path: &str) -> (u16, String) {
    let resp = reqwest::blocking::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}{path}", node.api_url()))
        .send()
        .unwrap();
    (resp.status().as_u16(), resp.text().unwrap_or_default())
}

#[test]
fn refusals_are_logged_metrics_parse_and_health_needs_no_token() {
    let mut lab = TestNode::init("lab");
    let mut hub = TestNode::init("hub");
    lab.start();
    hub.start();
    lab.add_peer(&hub, true);
    hub.add_peer_with(&lab, true, &["--skip", "User"]);
    let nodes = vec![lab, hub];
    wait_connected(&nodes);
    let (lab, hub) = (&nodes[0], &nodes[1]);
    lab.ok(&["put", "User", "u-1", r#"{"name":"Ada"}"#]);
    lab.ok(&["put", "Sample", "S-1", r#"{"v":1}"#]);
    wait_for("the hub takes the Sample", || {
        hub.get("Sample", "S-1").is_some()
    });
    wait_for("the hub logs the refused User", || {
        !inbox(hub, "refused").is_empty()
    });
    assert!(hub.get("User", "u-1").is_none());
    let r = &inbox(hub, "refused")[0];
    assert_eq!(
        (r["type"].as_str(), r["id"].as_str()),
        (Some("User"), Some("u-1")),
        "{r}"
    );
    assert_eq!(r["refusal"]["peer"], lab.id());
    assert!(!r["refusal"]["rule"].as_str().unwrap().is_empty(), "{r}");
    assert!(hub.status()["refusals_logged"].as_u64().unwrap() >= 1);
    assert!(hub.ok(&["conflicts"]).contains("refused User/u-1 from"));

    // Health: no token, nothing revealed.
    assert_eq!(get_plain(hub, "/healthz"), (200, "alive\n".into()));
    assert_eq!(get_plain(hub, "/readyz"), (200, "ready\n".into()));
    // Metrics: under the API's access rules, and valid to a real parser.
    assert_eq!(get_plain(hub, "/metrics").0, 401);
    let resp = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/metrics", hub.api_url()))
        .bearer_auth(hub.token().unwrap())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = resp.text().unwrap();
    let samples = parse_metrics(&text);
    let dump = || {
        samples
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let lab_ = [("peer", "lab")];
    assert_eq!(
        sample(&samples, "tidesync_peer_connected", &lab_),
        Some(1.0),
        "{}",
        dump()
    );
    assert!(
        sample(
            &samples,
            "tidesync_peer_refused_changes_total",
            &[("peer", "lab"), ("reason", "policy"), ("type", "User")]
        ) >= Some(1.0),
        "{}",
        dump()
    );
    assert!(sample(&samples, "tidesync_peer_changes_received_total", &lab_) >= Some(1.0));
    assert!(sample(&samples, "tidesync_peer_sync_bytes_received_total", &lab_) > Some(0.0));
    assert!(sample(&samples, "tidesync_peer_sync_bytes_sent_total", &lab_) > Some(0.0));
    assert_eq!(
        sample(&samples, "tidesync_objects", &[("type", "Sample")]),
        Some(1.0)
    );
    for name in [
        "tidesync_peer_lag_out_changes",
        "tidesync_peer_lag_in_changes",
        "tidesync_peer_seconds_since_sync",
        "tidesync_peer_held_changes",
        "tidesync_peer_duplicates_total",
        "tidesync_peer_file_bytes_received_total",
        "tidesync_store_bytes",
        "tidesync_files_wanted",
        "tidesync_concurrent_fields",
        "tidesync_file_bytes_received_total",
        "tidesync_batch_verify_seconds_count",
        "tidesync_batch_apply_seconds_count",
        "tidesync_batch_commit_seconds_count",
        "tidesync_local_write_seconds_count",
    ] {
        assert!(
            sample(&samples, name, &[]).is_some(),
            "no {name} in {}",
            dump()
        );
    }
    assert!(
        sample(&samples, "tidesync_batch_commit_seconds_count", &[]) >= Some(1.0),
        "the hub stored batches"
    );
    assert!(
        samples
            .iter()
            .any(|s| s[0].as_str().is_some_and(|n| n.starts_with("libp2p_"))),
        "libp2p's own metrics share the registry: {}",
        dump()
    );
    let lab_metrics = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/metrics", lab.api_url()))
        .bearer_auth(lab.token().unwrap())
        .send()
        .unwrap()
        .text()
        .unwrap();
    let lab_samples = parse_metrics(&lab_metrics);
    assert_eq!(
        sample(&lab_samples, "tidesync_local_write_seconds_count", &[]),
        Some(2.0),
        "the lab's two local writes are observed"
    );
}

#[test]
fn the_status_page_in_a_real_browser() {
    let mut nodes = conflicted_mesh(&["hub", "lab-1", "lab-2"]);
    let hub = &nodes[0];
    wait_for("the hub lists both values of status", || {
        inbox(hub, "fields").first().is_some_and(|i| {
            i["fields"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["path"] == "status"))
        })
    });
    let url = hub.ok(&["open"]).trim().to_string();
    assert!(
        url.starts_with(&hub.api_url()) && url.contains("/login?code="),
        "{url}"
    );

    let browser = Browser::start();
    // Without a session the page says how to get in, and shows nothing of the node.
    browser.goto(&format!("{}/", hub.api_url()));
    let text = browser
        .eval("return document.body.innerText")
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text.contains("tidesync open") && !text.contains(&hub.id()),
        "{text}"
    );
    // The login code sets the session cookie and leads to the page.
    browser.goto(&url);
    let fingerprint = hub
        .id()
        .parse::<tidesync_proto::NodeId>()
        .unwrap()
        .fingerprint();
    let page = |script: &str| browser.eval(script);
    wait_for("the page shows the node and both peers online", || {
        page("return document.querySelectorAll('tr.peer.online').length") == 2
            && page("return document.getElementById('fingerprint').textContent")
                == fingerprint.as_str()
    });
    assert!(
        page("return document.cookie") == "",
        "the session cookie is HttpOnly: no script can read it"
    );
    let text = page("return document.body.innerText")
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text.contains(&hub.id()) && text.contains("lab-1") && text.contains("Recent changes"),
        "{text}"
    );
    // The code was one-time.
    assert_eq!(
        get_plain(hub, url.trim_start_matches(&hub.api_url())).0,
        403
    );

    // A peer that stops goes offline on the page within a few seconds, without a reload.
    nodes[2].stop();
    let stopped = Instant::now();
    while page("return document.querySelector('tr.peer.offline[data-peer=\"lab-2\"]') !== null")
        != true
    {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "lab-2 still shows online"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Resolve `status` from the page, keeping lab-1's value.
    let clicked = page(
        "const b = [...document.querySelectorAll('button.pick')].find(b => b.dataset.path === 'status' \
           && b.closest('li').querySelector('.value').textContent === '\"failed\"'); \
         if (!b) return false; b.click(); return true;",
    );
    assert_eq!(clicked, true, "no button keeps \"failed\"");
    wait_for("the page says the field is resolved", || {
        page("return document.getElementById('message').textContent") == "Resolved."
    });
    for n in &nodes[..2] {
        wait_for(&format!("the resolution reaches {}", n.name), || {
            n.get("Sample", "S-001")
                .is_some_and(|o| o["status"] == "failed")
                && !inbox(n, "fields").iter().any(|i| {
                    i["fields"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|f| f["path"] == "status"))
                })
        });
    }
    let shot = artifact_dir().join("status-page.png");
    browser.screenshot(&shot);
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot at {}",
        shot.display()
    );
}

/// The fleet as `node` lists it, by name.
fn fleet(node: &TestNode) -> Vec<Value> {
    let (code, v) = node.http(reqwest::Method::GET, "/v1/fleet", None);
    assert_eq!(code, 200, "{v}");
    v.as_array().unwrap_or_else(|| panic!("{v}")).clone()
}

fn fleet_node(node: &TestNode, name: &str) -> Option<Value> {
    fleet(node).into_iter().find(|n| n["name"] == name)
}

#[test]
fn the_hub_shows_its_fleet_offline_nodes_and_bundle_ships_included_and_no_further() {
    // A star: two labs peered with the hub only, and a ship that only exchanges bundles.
    let mut hub = TestNode::init("hub");
    let mut lab_a = TestNode::init("lab-a");
    let mut lab_b = TestNode::init("lab-b");
    let ship = TestNode::init("ship");
    for n in [&mut hub, &mut lab_a, &mut lab_b] {
        // Status records at most once a second (the default is 30 s).
        let config = n.home().join("config.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains("status-interval-secs = 30"), "{text}");
        let text = text.replace("status-interval-secs = 30", "status-interval-secs = 1");
        std::fs::write(&config, text).unwrap();
        n.start();
    }
    for lab in [&lab_a, &lab_b] {
        lab.add_peer(&hub, true);
        hub.add_peer(lab, true);
    }
    hub.add_peer(&ship, false);
    ship.add_peer(&hub, false);
    lab_a.ok(&["put", "Sample", "S-1", r#"{"v":1}"#]);
    wait_for("the hub has both labs' signed status records", || {
        ["lab-a", "lab-b"].iter().all(|l| {
            fleet_node(&hub, l).is_some_and(|n| {
                n["record"]["peers"].as_array().is_some_and(|p| {
                    p.iter()
                        .any(|p| p["name"] == "hub" && p["connected"] == true)
                })
            })
        })
    });
    let a = fleet_node(&hub, "lab-a").unwrap();
    assert_eq!(a["id"], lab_a.id());
    assert_eq!(
        a["fingerprint"],
        lab_a
            .id()
            .parse::<tidesync_proto::NodeId>()
            .unwrap()
            .fingerprint()
    );
    assert_eq!(a["record"]["version"], env!("CARGO_PKG_VERSION"));
    wait_for("lab-a's record shows its object", || {
        fleet_node(&hub, "lab-a").is_some_and(|n| n["record"]["objects"] == 1)
    });
    // Records go to direct peers and no further: lab-b hears of the hub, never of lab-a.
    wait_for("lab-b has the hub's record", || {
        fleet_node(&lab_b, "hub").is_some()
    });
    assert_eq!(fleet(&lab_b).len(), 1, "{:?}", fleet(&lab_b));
    // Unless both ends say `relay-status`: then the hub passes on the records it holds, as
    // their authors signed them, and lab-b sees lab-a through the hub.
    hub.ok(&["peer", "set", "lab-b", "--relay-status", "true"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        fleet(&lab_b).len(),
        1,
        "lab-b's own policy refuses relayed records"
    );
    lab_b.ok(&["peer", "set", "hub", "--relay-status", "true"]);
    lab_a.ok(&["put", "Sample", "S-2", r#"{"v":2}"#]);
    wait_for("lab-b hears of lab-a through the hub", || {
        fleet_node(&lab_b, "lab-a").is_some_and(|n| n["record"]["objects"] == 2)
    });
    let relayed = fleet_node(&lab_b, "lab-a").unwrap();
    assert_eq!(relayed["via"], hub.id(), "{relayed}");
    assert_eq!(relayed["id"], lab_a.id(), "{relayed}");
    // lab-b's own record is not sent back to it, and lab-a, whose hub policy does not say
    // `relay-status`, still hears of the hub alone.
    assert!(fleet_node(&lab_b, "lab-b").is_none());
    assert_eq!(fleet(&lab_a).len(), 1, "{:?}", fleet(&lab_a));
    // A lab that goes offline still shows, with what the hub last knew of it.
    lab_a.stop();
    wait_for("the hub sees lab-a offline", || {
        hub.peer("lab-a")["connected"] == false
    });
    let a = fleet_node(&hub, "lab-a").expect("an offline lab still shows");
    assert!(a["record"]["made_ms"].as_i64().unwrap() > 0);
    // A ship that only exchanges bundles shows its last bundle receipt.
    let bundle = ship.home().join("to-hub.tsb");
    ship.ok(&["put", "Sample", "ship-1", r#"{"v":1}"#]);
    ship.ok(&["export", "--for", "hub", "--out", bundle.to_str().unwrap()]);
    hub.ok(&["import", bundle.to_str().unwrap()]);
    let s = fleet_node(&hub, "ship").expect("the ship shows after its bundle");
    assert!(
        s["bundle_ms"].as_i64().is_some() && s["record"].is_null(),
        "{s}"
    );
    let text = hub.ok(&["fleet"]);
    assert!(
        text.contains("lab-a (")
            && text.contains("status as of")
            && text.contains("last bundle received"),
        "{text}"
    );
    // No object may take the reserved type.
    let out = hub.cli(&["put", "TidesyncStatus", "x", "{}"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reserved"));
}
