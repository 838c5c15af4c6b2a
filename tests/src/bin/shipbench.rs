//! `shipbench`: a ship syncing with its hub over a satellite link, played by the shaped proxy
//! on 127.0.0.1: `--kbit` kbit/s each way (1,000), `--rtt-ms` round trips (800), the
//! connection cut every `--cut-secs` seconds (120). The hub holds `--records` sample records
//! of ten fields (2,000) and `--files` image files of `--file-kib` KiB (40 of 512: 20 MiB),
//! each referenced by an `Image` object; the ship starts empty and dials the hub through the
//! proxy.
//!
//! Reported: the time until the ship holds every record, and every file; the bytes that
//! crossed the link (both ways) against the payload (the records' JSON and the files' bytes),
//! as a ratio; how many connections the transfer took and how many the link cut; each node's
//! peak memory.
//!
//! Run: `cargo run --release -p tidesync-tests --bin shipbench -- [--records N] [--files N]
//! [--file-kib N] [--kbit N] [--rtt-ms N] [--cut-secs N]`.

use std::time::{Duration, Instant};

use serde_json::json;
use tidesync_tests::TestNode;
use tidesync_tests::bench::{lims_sample, peak_mib, request, wait_until, write_data};
use tidesync_tests::proxy::{FlakyProxy, Shape};

/// Longest the transfer may take before the benchmark gives up.
const RUN_LIMIT: Duration = Duration::from_secs(3_600);

fn arg(name: &str, default: u64) -> u64 {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let records = arg("--records", 2_000);
    let files = arg("--files", 40);
    let file_kib = arg("--file-kib", 512);
    let kbit = arg("--kbit", 1_000);
    let rtt_ms = arg("--rtt-ms", 800);
    let cut_secs = arg("--cut-secs", 120);
    println!(
        "shipbench: {records} records and {files} files of {file_kib} KiB over {kbit} kbit/s each way, {rtt_ms} ms round trips, cut every {cut_secs} s"
    );

    let mut hub = TestNode::init("hub");
    let mut ship = TestNode::init("ship");
    hub.start();
    ship.start();
    // The hub's data, stored before the link comes up: only the transfer is timed.
    let dir = tempfile::tempdir().expect("data dir");
    let mut payload = 0u64;
    let mut objects = Vec::new();
    for i in 0..files {
        let path = dir.path().join(format!("{i}.bin"));
        write_data(&path, file_kib * 1024, i + 1);
        let bytes = std::fs::read(&path).expect("read data");
        payload += bytes.len() as u64;
        let stored = request(
            &hub,
            reqwest::Method::POST,
            "/v1/files",
            Some(bytes),
            "application/octet-stream",
        );
        objects.push(json!({"type": "Image", "id": format!("I-{i:04}"), "fields": {
            "file": {"$file": stored["hash"], "size": stored["size"], "name": format!("{i}.png")},
            "volume": "Cruise 2026",
        }}));
    }
    objects.extend((0..records).map(lims_sample));
    for batch in objects.chunks(1_000) {
        let body = serde_json::to_vec(batch).expect("json");
        payload += body.len() as u64;
        request(
            &hub,
            reqwest::Method::POST,
            "/v1/objects",
            Some(body),
            "application/json",
        );
    }
    let port: u16 = hub
        .listen_addr()
        .split('/')
        .nth(4)
        .and_then(|p| p.parse().ok())
        .expect("listen port");
    let proxy = FlakyProxy::shaped(
        ([127, 0, 0, 1], port).into(),
        Shape {
            cut_after: Some(Duration::from_secs(cut_secs)),
            rate_bytes_per_sec: Some(kbit * 1_000 / 8),
            one_way_delay: Duration::from_millis(rtt_ms / 2),
            ..Shape::default()
        },
    );
    hub.add_peer(&ship, false);
    let t = Instant::now();
    let via = format!("/ip4/127.0.0.1/tcp/{}", proxy.addr().port());
    ship.ok(&["peer", "add", "hub", "--id", &hub.id(), "--addr", &via]);
    let mut records_at = None;
    let feed = format!("/v1/changes?since={}&files_since=0&limit=1", u64::MAX);
    wait_until(RUN_LIMIT, "the ship to hold every record and file", || {
        if records_at.is_none()
            && ship.status()["objects"]["Sample"]["live"].as_u64() == Some(records)
        {
            records_at = Some(t.elapsed().as_secs_f64());
        }
        let f = request(&ship, reqwest::Method::GET, &feed, None, "application/json");
        records_at.is_some() && f["files"]["last"].as_u64() == Some(files)
    });
    let secs = t.elapsed().as_secs_f64();
    let wire = proxy.bytes();
    println!(
        "records on the ship after {:.1} s; every file after {secs:.1} s",
        records_at.unwrap_or(secs)
    );
    println!(
        "bytes on the link {wire} (both ways) for a payload of {payload}: ratio {:.3}",
        wire as f64 / payload as f64
    );
    println!(
        "connections {} (the transfer started again {} times), cut by the link {}",
        proxy.connections(),
        proxy.connections().saturating_sub(1),
        proxy.cuts()
    );
    println!(
        "peak memory: hub {:.0} MiB, ship {:.0} MiB",
        peak_mib(hub.pid().expect("pid")),
        peak_mib(ship.pid().expect("pid"))
    );
    hub.stop();
    ship.stop();
}
