//! `zstdbench`: would zstd pay on a ship's link? It measures, on this machine, how much zstd
//! (levels 1, 3 and 9) shrinks what tidesync would send, and what it costs in CPU:
//! - the `Changes` frames a real core sends a peer for `--records` (2,000) LIMS sample records
//!   (SENAITE-like, ten fields) and for as many image annotations (BIIGLE-like): signed
//!   Automerge changes with their document headers, as they cross the wire;
//! - the same records as the JSON an application exports (what SENAITE.SYNC and BIIGLE move).
//!
//! For each: bytes before and after, compression and decompression speed, and the CPU time
//! per MB saved against the time that MB takes on a 1 Mbit/s link (8 s).
//!
//! Run: `cargo run --release -p tidesync-tests --bin zstdbench -- [--records N]`.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tidesync::core::Core;
use tidesync::identity::Identity;
use tidesync::policy::Policy;
use tidesync::store::Store;
use tidesync_proto::{Checkpoint, Message, ObjectId, TypeName};
use tidesync_tests::bench::{annotation, lims_sample};

/// Seconds one MB takes on a 1 Mbit/s link.
const LINK_SECS_PER_MB: f64 = 8.0;

/// The `Changes` frames (encoded as on the wire) a fresh core sends a new peer for `objects`.
fn frames(objects: &[Value]) -> Vec<Vec<u8>> {
    let store = Store::in_memory().expect("in-memory store");
    let clock = Arc::new(|| 1_800_000_000_000i64);
    let mut core = Core::with_clock(
        "hub".into(),
        Identity::from_secret([7; 32]),
        store,
        64,
        true,
        1,
        clock,
    );
    for o in objects {
        let ty = TypeName::new(o["type"].as_str().expect("type")).expect("type name");
        let id = ObjectId::new(o["id"].as_str().expect("id")).expect("object id");
        let fields = o["fields"].as_object().expect("fields");
        core.put(&ty, &id, fields).expect("put");
    }
    let ship = Identity::from_secret([8; 32]).node_id();
    core.set_policy(ship, "ship".into(), Policy::default())
        .expect("policy");
    core.on_connected(ship).expect("connected");
    let hello = Message::Hello {
        number: 1,
        node: ship,
        name: "ship".into(),
        resume: Checkpoint {
            seq: 0,
            hash: [0; 32],
        },
        tip: 0,
    };
    core.on_request(ship, hello, None).expect("hello");
    let mut frames = Vec::new();
    loop {
        let sent = core.take_outbox().sends;
        let batches: Vec<Message> = sent
            .into_iter()
            .filter(|(to, m)| *to == ship && matches!(m, Message::Changes { .. }))
            .map(|(_, m)| m)
            .collect();
        if batches.is_empty() {
            return frames;
        }
        for msg in batches {
            frames.push(tidesync_proto::wire::encode(&msg).expect("encode"));
            if let Message::Changes { batch, upto, .. } = msg {
                let ack = Message::Ack {
                    batch,
                    upto: upto.seq,
                    rejected: 0,
                };
                core.on_response(ship, ack).expect("ack");
            }
        }
    }
}

/// Compress each piece at `level`; report sizes, speeds and the trade.
fn measure(label: &str, pieces: &[Vec<u8>]) {
    let raw: usize = pieces.iter().map(Vec::len).sum();
    println!("{label}: {} pieces, {raw} bytes", pieces.len());
    for level in [1, 3, 9] {
        let t = Instant::now();
        let packed: Vec<Vec<u8>> = pieces
            .iter()
            .map(|p| zstd::bulk::compress(p, level).expect("compress"))
            .collect();
        let c_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for (p, raw_piece) in packed.iter().zip(pieces) {
            let back = zstd::bulk::decompress(p, raw_piece.len()).expect("decompress");
            assert_eq!(&back, raw_piece);
        }
        let d_secs = t.elapsed().as_secs_f64();
        let small: usize = packed.iter().map(Vec::len).sum();
        let saved_mb = (raw - small) as f64 / 1e6;
        let cpu_per_saved_mb = if saved_mb > 0.0 {
            (c_secs + d_secs) / saved_mb
        } else {
            f64::INFINITY
        };
        println!(
            "  level {level}: {small} bytes ({:.1} % of raw), compress {:.0} MB/s, decompress {:.0} MB/s; {:.4} s of CPU per MB saved, against {LINK_SECS_PER_MB} s per MB on a 1 Mbit/s link",
            100.0 * small as f64 / raw as f64,
            raw as f64 / 1e6 / c_secs,
            raw as f64 / 1e6 / d_secs,
            cpu_per_saved_mb
        );
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let records: u64 = argv
        .iter()
        .position(|a| a == "--records")
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    for (label, make) in [
        ("LIMS samples", lims_sample as fn(u64) -> Value),
        ("image annotations", annotation),
    ] {
        let objects: Vec<Value> = (0..records).map(make).collect();
        let json = serde_json::to_vec(&objects).expect("json");
        measure(&format!("{label}, as JSON an application exports"), &[json]);
        let frames = frames(&objects);
        measure(&format!("{label}, as tidesync's Changes frames"), &frames);
    }
}
