//! `bench sync`: two real nodes, lab A seeded and lab B syncing, every phase of issue 17's table
//! but the writers.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use tidesync_tests::{TestNode, wait_for};

use crate::*;

/// What `bench sync` measured (times in seconds unless named otherwise).
pub(crate) struct SyncFigures {
    pub(crate) bulk_create_s: f64,
    pub(crate) initial_sync_s: f64,
    pub(crate) idle_resync_ms: f64,
    pub(crate) idle_resync_bytes: f64,
    pub(crate) delta_reconnect_s: f64,
    pub(crate) delta_connected_s: f64,
    pub(crate) visible_p50_ms: f64,
    pub(crate) visible_p99_ms: f64,
    pub(crate) peak_a_mib: f64,
    pub(crate) peak_b_mib: f64,
}

/// `bench sync`: two real nodes, every phase of the issue's table but the writers.
pub(crate) fn sync(objects: usize) -> SyncFigures {
    println!("bench sync: {objects} objects of 10 fields, two nodes on 127.0.0.1");
    let mut a = TestNode::init("bench-a");
    let mut b = TestNode::init("bench-b");
    a.start();
    b.start();

    let t = Instant::now();
    seed(&a, 0, objects, 0);
    let bulk_create_s = t.elapsed().as_secs_f64();
    println!(
        "seeded lab A: {objects} objects in {bulk_create_s:.2} s (POST /v1/objects of {}, durable)",
        seed_batch()
    );
    let mut peaks = Peaks::default();
    peaks.note("seeding", &a, &b);

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
    // B's resident memory every 0.5 s: whether its peak is a spike or a climb.
    let rss_probe = {
        let stop = std::sync::Arc::clone(&probe_stop);
        let pid = b.pid().expect("running");
        std::thread::spawn(move || {
            let mut mib = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                mib.push(rss_kib(pid) as f64 / 1024.0);
                std::thread::sleep(Duration::from_millis(500));
            }
            mib
        })
    };
    wait_seq(&b, target);
    let initial = t.elapsed();
    probe_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rss = rss_probe.join().unwrap_or_default();
    if !rss.is_empty() {
        let at = |q: f64| rss[((rss.len() - 1) as f64 * q).round() as usize];
        println!(
            "B's resident memory during the initial sync ({} samples, 0.5 s apart): {:.0} / {:.0} / {:.0} / {:.0} MiB at a quarter, half, three quarters and the end; max {:.0} MiB",
            rss.len(),
            at(0.25),
            at(0.5),
            at(0.75),
            at(1.0),
            rss.iter().copied().fold(0.0, f64::max)
        );
    }
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
    peaks.note("the initial sync", &a, &b);

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
    let idle_resync_bytes =
        delta(&a_after, &a_before, "bytes_out") + delta(&b_after, &b_before, "bytes_out");
    println!(
        "idle resync: {session_ms} ms from connection up to in sync on both nodes ({:.1} ms from starting B's process, polled every 2 ms), {} frames, {} bytes on the wire",
        wall.as_secs_f64() * 1e3,
        delta(&a_after, &a_before, "frames_out") + delta(&b_after, &b_before, "frames_out"),
        idle_resync_bytes
    );

    // A 1 % delta while the link is down (B stopped).
    peaks.note("the idle resync", &a, &b);
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
    peaks.note("the 1 % delta", &a, &b);

    // A 1 % delta while connected: A edits objects one at a time, as an application writes,
    // over one keep-alive connection; the clock stops when B has stored the last edit.
    let edits = CONNECTED_EDITS.min(objects);
    let writer = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");
    let t = Instant::now();
    for k in 0..edits {
        let mut req = writer
            .put(format!("{}/v1/objects/Sample/S-{k:06}", a.api_url()))
            .header("content-type", "application/json")
            .body(fields(k, 2).to_string());
        if let Some(token) = a.token() {
            req = req.bearer_auth(token);
        }
        let resp = req.send().expect("a PUT");
        assert!(resp.status().is_success(), "PUT failed: {}", resp.status());
    }
    wait_seq(&b, target + edits as u64);
    let delta_connected = t.elapsed();
    println!(
        "1 % delta while connected ({edits} edits one at a time on A until B stored the last): {:.1} ms",
        delta_connected.as_secs_f64() * 1e3
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
        // Over the writer's keep-alive connection, as an application writes (`a.http` would
        // build a client and open a connection inside the timed span).
        let mut req = writer
            .put(format!("{}/v1/objects/Latency/L-{k}", a.api_url()))
            .header("content-type", "application/json")
            .body(r#"{"k":1}"#);
        if let Some(token) = a.token() {
            req = req.bearer_auth(token);
        }
        let t = Instant::now();
        let resp = req.send().expect("a PUT");
        assert!(resp.status().is_success(), "PUT failed: {}", resp.status());
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
    // What a user runs routinely must not scan the store: time B's status and conflicts
    // inbox (the best of 20 each), and report each store's size.
    for path in ["/v1/status", "/v1/conflicts"] {
        let best = (0..20)
            .map(|_| {
                let t = Instant::now();
                let (s, v) = b.http(Method::GET, path, None);
                assert_eq!(s, 200, "{path}: {v}");
                t.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min);
        println!("GET {path} on B: {best:.1} ms (best of 20, a new connection each)");
    }
    for node in [&a, &b] {
        let bytes = std::fs::metadata(node.home().join("store.redb")).map_or(0, |m| m.len());
        println!("store of {}: {:.1} MB", node.name, bytes as f64 / 1e6);
    }
    peaks.note("the end", &a, &b);
    let (peak_a_mib, peak_b_mib) = (peaks.a, peaks.b);
    println!(
        "peak memory (the highest of each node's processes): node A {peak_a_mib:.0} MiB, node B {peak_b_mib:.0} MiB"
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
    SyncFigures {
        bulk_create_s,
        initial_sync_s: initial.as_secs_f64(),
        idle_resync_ms: session_ms as f64,
        idle_resync_bytes: idle_resync_bytes as f64,
        delta_reconnect_s: delta_t.as_secs_f64(),
        delta_connected_s: delta_connected.as_secs_f64(),
        visible_p50_ms: percentile(&samples, 0.5),
        visible_p99_ms: percentile(&samples, 0.99),
        peak_a_mib,
        peak_b_mib,
    }
}

/// Each node's peak memory (VmHWM), the highest over all its processes: B is restarted
/// twice, and a restart starts its VmHWM again, so each phase notes both before B stops.
#[derive(Default)]
struct Peaks {
    a: f64,
    b: f64,
}

impl Peaks {
    /// Note each node's peak so far and print it (VmHWM only grows within a process, so each
    /// line shows whether its phase raised the peak).
    fn note(&mut self, phase: &str, a: &TestNode, b: &TestNode) {
        let (pa, pb) = (
            peak_rss_kib(a) as f64 / 1024.0,
            peak_rss_kib(b) as f64 / 1024.0,
        );
        self.a = self.a.max(pa);
        self.b = self.b.max(pb);
        println!(
            "peak memory of this process after {phase}: node A {pa:.0} MiB, node B {pb:.0} MiB"
        );
    }
}
