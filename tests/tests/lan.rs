//! A ship's own network: nodes in network namespaces the test creates, joined by a bridge,
//! with no configured addresses, find each other by mDNS and sync; a node that is not
//! configured is discovered, never dialled, refused when it dials, and counted.

use serde_json::json;
use tidesync_tests::netns::Lan;
use tidesync_tests::{TestNode, wait_for};

#[test]
fn nodes_on_a_ship_lan_find_each_other_by_mdns_and_a_stranger_is_refused() {
    let lan = Lan::new(&["bridge", "lab", "stranger"]);
    let mut bridge = TestNode::init_in("bridge", Some(lan.ns("bridge")), &["--mdns"]);
    let mut lab = TestNode::init_in("lab", Some(lan.ns("lab")), &["--mdns"]);
    let mut stranger = TestNode::init_in("stranger", Some(lan.ns("stranger")), &["--mdns"]);
    for n in [&mut bridge, &mut lab, &mut stranger] {
        n.start();
    }
    // Ids only: no node knows another's address.
    bridge.add_peer(&lab, false);
    lab.add_peer(&bridge, false);
    // The stranger knows the bridge, which does not know it.
    stranger.add_peer(&bridge, false);
    bridge.ok(&["put", "Sample", "S-001", r#"{"status":"on deck"}"#]);
    lab.ok(&["put", "Sample", "S-002", r#"{"status":"in the wet lab"}"#]);
    wait_for("the lab and the bridge hold both samples", || {
        bridge.get("Sample", "S-002").is_some() && lab.get("Sample", "S-001").is_some()
    });
    let status = bridge.status();
    assert!(
        status["discovered_peers"].as_u64().unwrap() >= 1,
        "{status}"
    );
    wait_for("the bridge counts the stranger it found", || {
        bridge.status()["discovered_strangers"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    wait_for("the bridge refuses the stranger's dial", || {
        bridge.status()["refused_connections"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(stranger.get("Sample", "S-001"), None);
    assert_eq!(stranger.peer("bridge")["connected"], json!(false));
    let peers = bridge.status()["peers"].clone();
    assert_eq!(
        peers.as_array().unwrap().len(),
        1,
        "discovery added no peer: {peers}"
    );
    for n in [&mut bridge, &mut lab, &mut stranger] {
        n.stop();
    }
}
