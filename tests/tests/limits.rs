//! Limits that keep one peer (or anyone who can reach the libp2p port) from starving a real
//! node process on 127.0.0.1: pending connections that never finish their handshake, and
//! refusal counts kept per type.

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use tidesync_tests::{TestNode, wait_for};

/// Silent sockets opened at once by the flood below: more than the node's pending-connection
/// cap (16), so that some are refused at once and the rest must time out.
const SILENT_SOCKETS: usize = 64;
/// The node's cap on incoming connections still in their handshake
/// (`net::MAX_PENDING_INCOMING_CONNECTIONS`).
const MAX_PENDING_INCOMING_CONNECTIONS: usize = 16;
/// Silent sockets the flood keeps open while the honest peer syncs: enough to hold every
/// pending slot.
const FLOOD_SOCKETS: usize = 24;

/// The TCP port of the node's first libp2p listen address (`/ip4/127.0.0.1/tcp/PORT`).
fn libp2p_port(node: &TestNode) -> u16 {
    let addr = node.listen_addr();
    addr.rsplit('/')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no TCP port in {addr}"))
}

/// Whether the node closed this socket (end of stream or reset); bytes it sent are read and
/// ignored.
fn closed_by_node(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

fn silent_socket(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the node");
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("read timeout");
    s
}

// Regression: there was no cap on incoming connections still in their handshake, so every
// socket that connects and never speaks was held for the whole 10 s handshake timeout, each
// one a file descriptor and a pending upgrade; a fast enough flood exhausts the node. Now the
// node refuses (and counts) the ones over the cap at once and closes the rest after the
// timeout, while an honest peer still connects and syncs and the API answers.
#[test]
fn silent_sockets_are_closed_and_an_honest_peer_still_syncs() {
    let mut n = [TestNode::init("victim"), TestNode::init("honest")];
    for node in &mut n {
        node.start();
    }
    let port = libp2p_port(&n[0]);
    let mut sockets: Vec<TcpStream> = (0..SILENT_SOCKETS).map(|_| silent_socket(port)).collect();
    // The sockets over the cap are refused while the first ones are still pending (they hold
    // their slots for the handshake timeout), and the node counts each refusal.
    wait_for("the node refuses the sockets over its pending cap", || {
        n[0].status()["refused_connections"].as_u64().unwrap_or(0)
            >= (SILENT_SOCKETS - MAX_PENDING_INCOMING_CONNECTIONS) as u64
    });
    wait_for(
        "the node closes every socket that never finishes a handshake",
        || {
            sockets.retain_mut(|s| !closed_by_node(s));
            sockets.is_empty()
        },
    );

    // Keep the pending slots full while an honest peer connects and syncs both ways.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                held.retain_mut(|s| !closed_by_node(s));
                while held.len() < FLOOD_SOCKETS {
                    match TcpStream::connect(("127.0.0.1", port)) {
                        Ok(s) => {
                            let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
                            held.push(s);
                        }
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    n[0].add_peer(&n[1], true);
    n[1].add_peer(&n[0], true);
    n[0].ok(&["put", "Sample", "S-V", r#"{"from":"victim"}"#]);
    n[1].ok(&["put", "Sample", "S-H", r#"{"from":"honest"}"#]);
    wait_for("both samples cross while the flood goes on", || {
        n[0].get("Sample", "S-H").is_some() && n[1].get("Sample", "S-V").is_some()
    });
    let (code, _) = n[0].http(reqwest::Method::GET, "/v1/status", None);
    assert_eq!(code, 200, "the API answers during the flood");
    stop.store(true, Ordering::Relaxed);
    flood.join().expect("flood thread");
}

// Regression: `rejected_types` had no bound: a `--direction send` peer (we take nothing from
// it) that sent changes of 20,000 type names grew its record to 20,000 keys and `status` to
// 1.26 MB. Now the most refused types keep their names and the rest share `(other)`.
#[test]
fn refusal_counts_per_type_are_capped() {
    const TYPES: usize = 100;
    const MAX_REJECTED_TYPES: usize = 64;
    let mut n = [TestNode::init("lab"), TestNode::init("sender")];
    for node in &mut n {
        node.start();
    }
    n[0].add_peer_with(&n[1], true, &["--direction", "send"]);
    n[1].add_peer(&n[0], true);
    let items: Vec<_> = (0..TYPES)
        .map(|i| json!({"type": format!("T{i:03}"), "id": "X", "fields": {"i": i}}))
        .collect();
    let body = serde_json::Value::Array(items).to_string();
    let (code, answer) = n[1].http(reqwest::Method::POST, "/v1/objects", Some(&body));
    assert_eq!(code, 200, "{answer}");
    wait_for("the lab refuses every change", || {
        n[0].peer("sender")["rejected"].as_u64() == Some(TYPES as u64)
    });
    let by_type = n[0].peer("sender")["rejected_types"]
        .as_object()
        .cloned()
        .expect("rejected_types");
    assert_eq!(by_type.len(), MAX_REJECTED_TYPES, "{by_type:?}");
    let total: u64 = by_type.values().filter_map(|v| v.as_u64()).sum();
    assert_eq!(total, TYPES as u64);
    assert!(by_type["(other)"].as_u64().unwrap_or(0) > 0, "{by_type:?}");
}
