//! QUIC beside TCP between real node processes on 127.0.0.1: two nodes that listen on QUIC
//! alone sync records and a file, and a peer that prefers QUIC is dialled over it when it
//! offers both transports, and over TCP when it prefers TCP. Status names the transport.

use tidesync_tests::{TestNode, content, wait_for};

const QUIC: &str = "/ip4/127.0.0.1/udp/0/quic-v1";
const TCP: &str = "/ip4/127.0.0.1/tcp/0";

#[test]
fn records_and_a_file_cross_a_quic_only_link() {
    let dir = tempfile::tempdir().unwrap();
    let mut ship = TestNode::init_with("ship", &["--listen", QUIC]);
    let mut hub = TestNode::init_with("hub", &["--listen", QUIC]);
    ship.start();
    hub.start();
    let addrs = hub.listen_addrs();
    assert!(
        addrs
            .iter()
            .all(|a| a.contains("/udp/") && a.ends_with("/quic-v1")),
        "the hub listens on QUIC alone: {addrs:?}"
    );
    hub.add_peer(&ship, false);
    ship.add_peer(&hub, true);
    let image = content(3 * 1024 * 1024 + 17, 7);
    let path = dir.path().join("image.png");
    std::fs::write(&path, &image).unwrap();
    for i in 0..50 {
        ship.ok(&[
            "put",
            "Sample",
            &format!("S-{i:03}"),
            &format!(r#"{{"depth_m": {i}}}"#),
        ]);
    }
    ship.ok(&[
        "put",
        "Image",
        "I-001",
        "{}",
        "--file",
        &format!("image={}", path.display()),
    ]);
    let hash = ship.get("Image", "I-001").unwrap()["image"]["$file"]
        .as_str()
        .unwrap()
        .to_string();
    let got = dir.path().join("got.png");
    wait_for(
        "the records and the file to reach the hub over QUIC",
        || {
            hub.get("Sample", "S-049").is_some()
                && hub
                    .cli(&["file", "get", &hash, "--out", got.to_str().unwrap()])
                    .status
                    .success()
        },
    );
    assert_eq!(std::fs::read(&got).unwrap(), image);
    assert_eq!(hub.peer("ship")["via"], "quic");
    assert_eq!(ship.peer("hub")["via"], "quic");
}

#[test]
fn a_peer_offering_both_is_dialled_over_the_preferred_transport() {
    let mut hub = TestNode::init_with("hub", &["--listen", TCP, "--listen", QUIC]);
    hub.start();
    let addrs = hub.listen_addrs();
    let tcp = addrs.iter().find(|a| a.contains("/tcp/")).unwrap().clone();
    let quic = addrs
        .iter()
        .find(|a| a.contains("/quic-v1"))
        .unwrap()
        .clone();
    for (prefer, want) in [("quic", "quic"), ("tcp", "tcp")] {
        let mut ship = TestNode::init(&format!("ship-{prefer}"));
        ship.start();
        hub.add_peer(&ship, false);
        // TCP listed first: the preference, not the order, picks the transport.
        ship.ok(&[
            "peer",
            "add",
            "hub",
            "--id",
            &hub.id(),
            "--addr",
            &tcp,
            "--addr",
            &quic,
            "--prefer",
            prefer,
        ]);
        wait_for("the ship to connect", || {
            ship.peer("hub")["connected"] == true
        });
        assert_eq!(ship.peer("hub")["via"], want, "prefer {prefer}");
        let id = format!("S-{prefer}");
        ship.ok(&["put", "Sample", &id, r#"{"depth_m": 1}"#]);
        wait_for("the sample to reach the hub", || {
            hub.get("Sample", &id).is_some()
        });
        ship.stop();
        hub.ok(&["peer", "rm", &format!("ship-{prefer}")]);
    }
}
