//! `bench held-release --changes N`: the engine releasing a chain of N held changes that arrived
//! in reverse (run it as `cargo run --release -p tidesync-tests --bin bench -- held-release`).
//!
//! `bench sync --objects N`: two real tidesync nodes on 127.0.0.1; measures the initial sync of
//! N objects of ten fields, an idle resync, a 1 % delta, the time for one change to become
//! visible on the peer, and each node's peak memory.
//!
//! Run it as `cargo run --release -p tidesync-tests --bin bench -- sync --objects 50000`.
//!
//! `bench writers --clients 16 --secs 10`: one real node; each client PUTs objects of ten
//! fields one at a time over its own keep-alive connection for the given time; prints the
//! durable writes per second and the latency percentiles (group commit, issue 17).
//! `TIDESYNC_TEST_LOG=debug TIDESYNC_BENCH_LOGS=DIR` also keeps both nodes' logs in DIR.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use tidesync_tests::{TestNode, wait_for};

/// Objects per `POST /v1/objects` while seeding.
const SEED_BATCH: usize = 2_000;
/// Changes timed for visibility latency.
const LATENCY_SAMPLES: usize = 200;

fn fields(i: usize, round: usize) -> Value {
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

fn seed(node: &TestNode, from: usize, to: usize, round: usize) {
    let mut i = from;
    while i < to {
        let end = (i + SEED_BATCH).min(to);
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

fn net(node: &TestNode) -> Value {
    node.status()["net"].clone()
}

fn delta(after: &Value, before: &Value, key: &str) -> u64 {
    after[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0)
}

fn peak_rss_kib(node: &TestNode) -> u64 {
    let pid = node.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) the node's process has used so far.
fn cpu_secs(node: &TestNode) -> f64 {
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

fn last_seq(node: &TestNode) -> u64 {
    node.http(Method::GET, "/v1/status", None).1["last_seq"]
        .as_u64()
        .unwrap_or(0)
}

/// Wait until `node` has stored SEQ `target`: its change feed, long-polled from `target - 1`,
/// answers the moment that SEQ commits, and costs the node nothing while it waits.
fn wait_seq(node: &TestNode, target: u64) {
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `GET url` every 20 ms until `stop`: each request's latency in milliseconds.
/// Latencies, in ms, of one API request repeated every 20 ms until `stop`: a GET, or a PUT of
/// `body` when there is one. Only successful answers count.
fn api_latencies(
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

/// `bench held-release --changes N`: the engine releases a chain of N changes to one document
/// that arrived newest first (all held), once its first change arrives.
fn held_release(n: usize) {
    use automerge::{Automerge, ROOT, transaction::Transactable};
    use tidesync::identity::Identity;
    use tidesync::replica::engine::{Arrival, Engine};
    use tidesync_proto::{DocHeader, DocId, ObjectId, SignedChange, TypeName};
    let author = Identity::from_secret([1; 32]);
    let me = author.node_id();
    let ty = TypeName::new("Sample").expect("type");
    let id = ObjectId::new("S-chain").expect("id");
    let header = DocHeader {
        doc: DocId::derive(&me, &ty, &id),
        origin: me,
        ty,
        id,
    };
    let t = Instant::now();
    let mut doc = Automerge::new().with_actor(tidesync_proto::ids::actor_id(&me, 1).into());
    let mut chain: Vec<SignedChange> = Vec::with_capacity(n);
    for i in 0..n {
        let mut tx = doc.transaction();
        tx.put(ROOT, "n", i as i64).expect("put");
        tx.commit();
        let c = doc.get_last_local_change().expect("a change");
        chain.push(SignedChange::sign(author.signing_key(), header.doc, &c));
    }
    println!(
        "built a chain of {n} signed changes in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let first = chain.remove(0);
    let verified = first.verify().expect("verifies");
    let held = chain.into_iter().rev().map(|c| (c, Some(me))).collect();
    let engine = Engine::new(Identity::from_secret([2; 32]), 1);
    let t = Instant::now();
    let arrived = engine.receive(Arrival {
        header: header.clone(),
        from: me,
        existing: None,
        held,
        incoming: vec![(first, verified)],
        name: header.id.clone(),
        name_taken: false,
        one_by_one: false,
        bans: Default::default(),
    });
    let took = t.elapsed();
    assert_eq!(arrived.received.applied.len(), n, "every change applied");
    println!(
        "released a reversed chain of {n} changes in {:.2} s ({:.1} µs per change)",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / n as f64
    );
}

/// Concurrent single-object PUTs against one node: `clients` threads, each over its own
/// keep-alive connection, for `secs` seconds.
fn writers(clients: usize, secs: u64) {
    println!("bench writers: {clients} clients, {secs} s, one node on 127.0.0.1");
    let mut node = TestNode::init("bench-writers");
    node.start();
    let (url, token) = (node.api_url(), node.token().map(str::to_string));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (url, token) = (url.clone(), token.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .expect("http client");
                let mut latencies = Vec::new();
                let mut n = 0;
                while Instant::now() < deadline {
                    let body = fields(c * 1_000_000 + n, 0).to_string();
                    let mut req = client
                        .put(format!("{url}/v1/objects/Sample/W-{c:02}-{n:07}"))
                        .header("content-type", "application/json")
                        .body(body);
                    if let Some(t) = &token {
                        req = req.bearer_auth(t);
                    }
                    let t = Instant::now();
                    let resp = req.send().expect("a PUT");
                    assert!(resp.status().is_success(), "PUT failed: {}", resp.status());
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    let mut all: Vec<f64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("a client"))
        .collect();
    let took = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    println!(
        "durable writes: {} in {took:.2} s = {:.0} per s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        all.len(),
        all.len() as f64 / took,
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or(0.0)
    );
    println!("peak memory: {} MiB", peak_rss_kib(&node) / 1024);
    node.stop();
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
    if args.get(1).map(String::as_str) == Some("writers") {
        writers(arg("--clients", 16) as usize, arg("--secs", 10));
        return;
    }
    if args.get(1).map(String::as_str) == Some("held-release") {
        let n = args
            .iter()
            .position(|a| a == "--changes")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(100_000);
        held_release(n);
        return;
    }
    let objects = args
        .iter()
        .position(|a| a == "--objects")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(50_000);
    if args.get(1).map(String::as_str) != Some("sync") {
        eprintln!(
            "usage: bench sync [--objects N] | bench writers [--clients N] [--secs S] | bench held-release [--changes N]"
        );
        std::process::exit(2);
    }
    println!("bench sync: {objects} objects of 10 fields, two nodes on 127.0.0.1");
    let mut a = TestNode::init("bench-a");
    let mut b = TestNode::init("bench-b");
    a.start();
    b.start();

    let t = Instant::now();
    seed(&a, 0, objects, 0);
    println!(
        "seeded lab A: {objects} objects in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // B holds one object of its own, which the probes below read and write during the sync;
    // its PUTs there repeat this body, so they add nothing to B's log.
    let probe_body = json!({"text": "written during the initial sync"});
    b.http(
        Method::PUT,
        "/v1/objects/Note/probe",
        Some(&probe_body.to_string()),
    );
    let own = last_seq(&b);

    // A accepts B but does not dial; B dials A when it is told about it: the clock starts then.
    a.add_peer(&b, false);
    let (a_before, b_before) = (net(&a), net(&b));
    let (a_cpu, b_cpu) = (cpu_secs(&a), cpu_secs(&b));
    let t = Instant::now();
    b.add_peer(&a, true);
    let target = objects as u64 + own;
    // While B receives, three clients ask B's API every 20 ms: its status, an object it holds
    // (reads, answered off the node actor) and a PUT of that object (a write, which waits for
    // the batch the actor is storing): how long the API keeps people waiting.
    let probe_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probes: Vec<(&str, std::thread::JoinHandle<Vec<f64>>)> = [
        ("GET /v1/status", "/v1/status", None),
        ("GET /v1/objects/Note/probe", "/v1/objects/Note/probe", None),
        (
            "PUT /v1/objects/Note/probe",
            "/v1/objects/Note/probe",
            Some(probe_body.clone()),
        ),
    ]
    .into_iter()
    .map(|(label, path, body)| {
        let stop = std::sync::Arc::clone(&probe_stop);
        let url = format!("{}{path}", b.api_url());
        let token = b.token().map(str::to_string);
        let probe = std::thread::spawn(move || api_latencies(&url, token.as_deref(), body, &stop));
        (label, probe)
    })
    .collect();
    wait_seq(&b, target);
    let initial = t.elapsed();
    probe_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let probes: Vec<(&str, Vec<f64>)> = probes
        .into_iter()
        .map(|(label, probe)| (label, probe.join().unwrap_or_default()))
        .collect();
    let (a_cpu, b_cpu) = (cpu_secs(&a) - a_cpu, cpu_secs(&b) - b_cpu);
    let (a_after, b_after) = (net(&a), net(&b));
    println!(
        "initial sync: {:.2} s ({:.0} objects/s), {} frames, {:.1} MB on the wire; CPU used: sender A {:.2} s, receiver B {:.2} s",
        initial.as_secs_f64(),
        objects as f64 / initial.as_secs_f64(),
        delta(&a_after, &a_before, "frames_out") + delta(&b_after, &b_before, "frames_out"),
        (delta(&a_after, &a_before, "bytes_out") + delta(&b_after, &b_before, "bytes_out")) as f64
            / 1e6,
        a_cpu,
        b_cpu
    );
    for (label, mut lat) in probes {
        lat.sort_by(f64::total_cmp);
        if !lat.is_empty() {
            println!(
                "API during the initial sync ({label} on B every 20 ms, {} requests): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                lat.len(),
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                lat[lat.len() - 1]
            );
        }
    }

    // Idle resync: drop the link (B stops) and bring it back (B starts and dials A); nothing
    // differs. (`peer rm` and `peer add` would not do: a peer removed and added again starts
    // from 0, by design.)
    wait_for("A has nothing pending for B", || {
        a.peer("bench-b")["pending_out"] == json!(0)
    });
    b.stop();
    wait_for("link down", || {
        a.peer("bench-b")["connected"] == json!(false)
    });
    let a_before = net(&a);
    let t = Instant::now();
    b.start();
    let b_before = json!({});
    // Both nodes time the session themselves, from connection up to in sync; the wall clock
    // here also counts the `peer add` process and the dial.
    let in_sync = |node: &TestNode, peer: &str| node.peer(peer)["in_sync_after_ms"].as_i64();
    while in_sync(&a, "bench-b").is_none() || in_sync(&b, "bench-a").is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "idle resync never ended"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = t.elapsed();
    let session_ms = in_sync(&a, "bench-b")
        .unwrap_or(0)
        .max(in_sync(&b, "bench-a").unwrap_or(0));
    std::thread::sleep(Duration::from_millis(300));
    let (a_after, b_after) = (net(&a), net(&b));
    println!(
        "idle resync: {session_ms} ms from connection up to in sync on both nodes ({:.1} ms from starting B's process, polled every 2 ms), {} frames, {} bytes on the wire",
        wall.as_secs_f64() * 1e3,
        delta(&a_after, &a_before, "frames_out") + delta(&b_after, &b_before, "frames_out"),
        delta(&a_after, &a_before, "bytes_out") + delta(&b_after, &b_before, "bytes_out")
    );

    // A 1 % delta while the link is down (B stopped).
    b.stop();
    wait_for("link down", || {
        a.peer("bench-b")["connected"] == json!(false)
    });
    let changed = (objects / 100).max(1);
    seed(&a, 0, changed, 1);
    let a_before = net(&a);
    let t = Instant::now();
    b.start();
    let b_before = json!({});
    let target = (objects + changed) as u64 + own;
    wait_seq(&b, target);
    let delta_t = t.elapsed();
    let (a_after, b_after) = (net(&a), net(&b));
    println!(
        "1 % delta ({changed} changed objects): {:.1} ms, {} frames, {:.2} MB on the wire",
        delta_t.as_secs_f64() * 1e3,
        delta(&a_after, &a_before, "frames_out") + delta(&b_after, &b_before, "frames_out"),
        (delta(&a_after, &a_before, "bytes_out") + delta(&b_after, &b_before, "bytes_out")) as f64
            / 1e6
    );

    // One change visible on the peer: B long-polls its change feed while A writes.
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    let b_url = b.api_url();
    let poller = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    for k in 0..LATENCY_SAMPLES {
        let since = last_seq(&b);
        let url = format!("{b_url}/v1/changes?since={since}&wait=10&limit=1");
        let p = poller.clone();
        let token = b.token().unwrap_or_default().to_string();
        let waiter = std::thread::spawn(move || {
            let v: Value = p
                .get(url)
                .bearer_auth(token)
                .send()
                .unwrap()
                .json()
                .unwrap();
            (Instant::now(), v)
        });
        std::thread::sleep(Duration::from_millis(5));
        let t = Instant::now();
        let (s, _) = a.http(
            Method::PUT,
            &format!("/v1/objects/Latency/L-{k}"),
            Some(r#"{"k":1}"#),
        );
        assert_eq!(s, 200);
        let (seen_at, v) = waiter.join().unwrap();
        assert_eq!(v["changes"][0]["id"], json!(format!("L-{k}")), "{v}");
        samples.push(seen_at.duration_since(t).as_secs_f64() * 1e3);
    }
    samples.sort_by(|x, y| x.partial_cmp(y).unwrap());
    println!(
        "one change visible on the peer (PUT on A until B's feed returns it, {LATENCY_SAMPLES} samples): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99)
    );
    println!(
        "peak memory: node A {} MiB, node B {} MiB",
        peak_rss_kib(&a) / 1024,
        peak_rss_kib(&b) / 1024
    );
    // `TIDESYNC_BENCH_LOGS=DIR` keeps both nodes' logs (`TIDESYNC_TEST_LOG=debug` shows each
    // batch's verify, apply and commit times).
    if let Ok(dir) = std::env::var("TIDESYNC_BENCH_LOGS") {
        for node in [&a, &b] {
            let path = std::path::Path::new(&dir).join(format!("{}.log", node.name));
            std::fs::write(&path, node.log()).expect("writing a node log");
            println!("log kept: {}", path.display());
        }
    }
}
