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
//!
//! With `--wan tcp|quic` (root: it makes network namespaces and TUN devices) the link is
//! instead the packet-level one of `tidesync_tests::wan`, between two namespaces, and the
//! ship dials the hub over that transport: `--loss-pct F` of the packets are lost at random,
//! and every `--cut-secs` the link goes down for `--outage-secs` (10) both ways; the modem
//! queues at most one second of traffic. Reported as well: packets delivered and dropped.

use std::time::{Duration, Instant};

use serde_json::json;
use tidesync_tests::TestNode;
use tidesync_tests::bench::{lims_sample, peak_mib, request, wait_until, write_data};
use tidesync_tests::proxy::{FlakyProxy, Shape};
use tidesync_tests::wan::{WAN_ADDRS, Wan, WanShape};

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

fn text_arg(name: &str) -> Option<String> {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .cloned()
}

/// The link under test: the TCP proxy, or the packet-level link between namespaces.
enum Link {
    Proxy(FlakyProxy),
    Wan(Wan),
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
    let (link, via) = match text_arg("--wan") {
        None => {
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
            let via = format!("/ip4/127.0.0.1/tcp/{}", proxy.addr().port());
            (Link::Proxy(proxy), via)
        }
        Some(transport) => {
            // The hub moves into a namespace of the link, listening on both transports at a
            // fixed port there; the ship starts in the other one.
            hub.stop();
            let config = hub.home().join("config.toml");
            let text = std::fs::read_to_string(&config).expect("hub config");
            let listen = r#"listen = ["/ip4/0.0.0.0/tcp/7400", "/ip4/0.0.0.0/udp/7400/quic-v1"]"#;
            let text: Vec<String> = text
                .lines()
                .map(|l| {
                    if l.starts_with("listen = [") {
                        listen.to_string()
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            std::fs::write(&config, text.join("\n") + "\n").expect("hub config");
            let wan = Wan::new(WanShape {
                rate_bytes_per_sec: kbit * 1_000 / 8,
                one_way_delay: Duration::from_millis(rtt_ms / 2),
                loss: text_arg("--loss-pct")
                    .and_then(|p| p.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    / 100.0,
                max_queue: Duration::from_secs(1),
                outage_every: Some(Duration::from_secs(cut_secs)),
                outage_for: Duration::from_secs(arg("--outage-secs", 10)),
                seed: arg("--seed", 1),
            });
            ship.stop();
            ship.set_netns(Some(wan.ns(1)));
            hub.set_netns(Some(wan.ns(0)));
            let ship_config = ship.home().join("config.toml");
            let text = std::fs::read_to_string(&ship_config).expect("ship config");
            std::fs::write(
                &ship_config,
                text.replace("/ip4/127.0.0.1/tcp/0", "/ip4/0.0.0.0/tcp/0"),
            )
            .expect("ship config");
            hub.start();
            ship.start();
            let via = match transport.as_str() {
                "quic" => format!("/ip4/{}/udp/7400/quic-v1", WAN_ADDRS[0]),
                _ => format!("/ip4/{}/tcp/7400", WAN_ADDRS[0]),
            };
            (Link::Wan(wan), via)
        }
    };
    hub.add_peer(&ship, false);
    let t = Instant::now();
    ship.ok(&["peer", "add", "hub", "--id", &hub.id(), "--addr", &via]);
    let mut records_at = None;
    wait_until(RUN_LIMIT, "the ship to hold every record and file", || {
        if records_at.is_none()
            && ship.status()["objects"]["Sample"]["live"].as_u64() == Some(records)
        {
            records_at = Some(t.elapsed().as_secs_f64());
        }
        // Through the CLI, which runs in the ship's namespace when it has one.
        let stored: serde_json::Value =
            serde_json::from_str(&ship.ok(&["file", "ls", "--json"])).unwrap_or_default();
        records_at.is_some() && stored.as_array().map(|a| a.len() as u64) == Some(files)
    });
    let secs = t.elapsed().as_secs_f64();
    let wire = match &link {
        Link::Proxy(p) => p.bytes(),
        Link::Wan(w) => w.bytes(),
    };
    println!(
        "records on the ship after {:.1} s; every file after {secs:.1} s",
        records_at.unwrap_or(secs)
    );
    println!(
        "bytes on the link {wire} (both ways) for a payload of {payload}: ratio {:.3}",
        wire as f64 / payload as f64
    );
    match &link {
        Link::Proxy(proxy) => println!(
            "connections {} (the transfer started again {} times), cut by the link {}",
            proxy.connections(),
            proxy.connections().saturating_sub(1),
            proxy.cuts()
        ),
        Link::Wan(wan) => {
            let connected = ship.log().matches("peer connected").count();
            println!(
                "over {via}: connections {connected} (the transfer started again {} times), outages {}, packets delivered {}, dropped {}",
                connected.saturating_sub(1),
                wan.outages(),
                wan.packets(),
                wan.dropped()
            );
        }
    }
    println!(
        "peak memory: hub {:.0} MiB, ship {:.0} MiB",
        peak_mib(hub.pid().expect("pid")),
        peak_mib(ship.pid().expect("pid"))
    );
    hub.stop();
    ship.stop();
}
