//! One node, or the engine alone: `bench writers` (concurrent durable PUTs) and `bench
//! held-release` (a reversed chain of held changes released at once).

use std::time::{Duration, Instant};

use tidesync_tests::TestNode;

use crate::{fields, peak_rss_kib, percentile};

/// `bench held-release --changes N`: the engine releases a chain of N changes to one document
/// that arrived newest first (all held), once its first change arrives.
pub(crate) fn held_release(n: usize) {
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

/// What `bench writers` measured: durable writes per second and latency percentiles, in ms.
pub(crate) struct WriterFigures {
    pub(crate) per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

/// Concurrent single-object PUTs against one node: `clients` threads, each over its own
/// keep-alive connection, for `secs` seconds.
pub(crate) fn writers(clients: usize, secs: u64) -> WriterFigures {
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
    WriterFigures {
        per_s: all.len() as f64 / took,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
    }
}
