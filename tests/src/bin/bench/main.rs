//! `bench held-release --changes N`: the engine releasing a chain of N held changes that arrived
//! in reverse (run it as `cargo run --release -p tidesync-tests --bin bench -- held-release`).
//!
//! `bench sync --objects N`: two real tidesync nodes on 127.0.0.1; measures the initial sync of
//! N objects of ten fields, an idle resync, a 1 % delta, the time for one change to become
//! visible on the peer, and each node's peak memory.
//!
//! Run it as `cargo run --release -p tidesync-tests --bin bench -- sync --objects 50000`.
//!
//! `bench side-by-side --objects N`: `sync` and `writers`, then PouchDB 9 through the same
//! phases with the same records in the same run (Node.js needed; PouchDB is installed with npm
//! in `tests/pouchbench/`), and the table with PouchDB's figure over tidesync's.
//!
//! `bench writers --clients 16 --secs 10`: one real node; each client PUTs objects of ten
//! fields one at a time over its own keep-alive connection for the given time; prints the
//! durable writes per second and the latency percentiles (group commit, issue 17).
//! `TIDESYNC_TEST_LOG=debug TIDESYNC_BENCH_LOGS=DIR` also keeps both nodes' logs in DIR.
//!
//! Modules: `sync` (the two-node phases), `single` (the writers and the held-chain release),
//! `side` (PouchDB beside tidesync, and the table).

mod side;
mod single;
mod sync;

use side::side_by_side;
use single::{held_release, writers};
use sync::sync;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use tidesync_tests::TestNode;

/// Objects per `POST /v1/objects` while seeding: PouchDB's bulkDocs in the side-by-side run
/// takes 1,000 at a time too (`TIDESYNC_BENCH_BATCH` overrides it).
pub(crate) fn seed_batch() -> usize {
    std::env::var("TIDESYNC_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}
/// Changes timed for visibility latency.
pub(crate) const LATENCY_SAMPLES: usize = 200;
/// Edits in the "1 % delta while connected" phase (the 500).
pub(crate) const CONNECTED_EDITS: usize = 500;

pub(crate) fn fields(i: usize, round: usize) -> Value {
    json!({
        "status": if round == 0 { "received" } else { "analysed" },
        "volume_ml": 1.0 + (i % 100) as f64 / 10.0,
        "site": format!("site-{}", i % 17),
        "operator": format!("op-{}", i % 29),
        "batch": i / 100,
        "priority": i % 5,
        "container": "vial-2ml",
        "received_at": 1_700_000_000 + i as i64,
        "tags": ["bench", format!("t{}", i % 7)],
        "round": round,
    })
}

pub(crate) fn seed(node: &TestNode, from: usize, to: usize, round: usize) {
    let mut i = from;
    while i < to {
        let end = (i + seed_batch()).min(to);
        let items: Vec<Value> = (i..end)
            .map(|k| json!({"type": "Sample", "id": format!("S-{k:06}"), "fields": fields(k, round)}))
            .collect();
        let (s, v) = node.http(
            Method::POST,
            "/v1/objects",
            Some(&Value::Array(items).to_string()),
        );
        assert_eq!(s, 200, "seeding failed: {v}");
        i = end;
    }
}

pub(crate) fn net(node: &TestNode) -> Value {
    node.status()["net"].clone()
}

pub(crate) fn delta(after: &Value, before: &Value, key: &str) -> u64 {
    after[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0)
}

pub(crate) fn peak_rss_kib(node: &TestNode) -> u64 {
    proc_status_kib(node.pid().expect("running"), "VmHWM:")
}

/// The resident memory (VmRSS) of process `pid` now, in KiB (0 once it is gone).
pub(crate) fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// One figure in KiB of `/proc/PID/status` (`VmHWM:`, `VmRSS:`; 0 if it cannot be read).
fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) the node's process has used so far.
pub(crate) fn cpu_secs(node: &TestNode) -> f64 {
    let pid = node.pid().expect("running");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are the 12th
    // and 13th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

pub(crate) fn last_seq(node: &TestNode) -> u64 {
    node.http(Method::GET, "/v1/status", None).1["last_seq"]
        .as_u64()
        .unwrap_or(0)
}

/// Wait until `node` has stored SEQ `target`: its change feed, long-polled from `target - 1`,
/// answers the moment that SEQ commits, and costs the node nothing while it waits.
pub(crate) fn wait_seq(node: &TestNode, target: u64) {
    loop {
        let (s, v) = node.http(
            Method::GET,
            &format!("/v1/changes?since={}&wait=30&limit=1", target - 1),
            None,
        );
        assert_eq!(s, 200, "{v}");
        if v["changes"].as_array().is_some_and(|c| !c.is_empty()) {
            return;
        }
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Latencies, in ms, of one API request repeated every 20 ms until `stop`: a GET, or a PUT of
/// `body` when there is one. Only successful answers count.
pub(crate) fn api_latencies(
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<f64> {
    let client = reqwest::blocking::Client::new();
    let mut out = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        let mut req = match &body {
            Some(body) => client.put(url).json(body),
            None => client.get(url),
        };
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if req.send().is_ok_and(|r| r.status().is_success()) {
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let objects = arg("--objects", 50_000) as usize;
    match args.get(1).map(String::as_str) {
        Some("writers") => {
            writers(arg("--clients", 16) as usize, arg("--secs", 10));
        }
        Some("held-release") => held_release(arg("--changes", 100_000) as usize),
        Some("sync") => {
            sync(objects);
        }
        Some("side-by-side") => side_by_side(objects),
        _ => {
            eprintln!(
                "usage: bench sync [--objects N] | bench side-by-side [--objects N] | bench writers [--clients N] [--secs S] | bench held-release [--changes N]"
            );
            std::process::exit(2);
        }
    }
}
