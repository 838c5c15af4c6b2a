//! What the benchmark binaries share: records resembling a LIMS's and an annotation server's,
//! data files of pseudo-random bytes, a process's peak memory, waiting for a condition, and
//! raw HTTP requests to a node.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::TestNode;

/// Write `len` bytes of pseudo-random data (xorshift from `seed`, so incompressible) to `path`.
pub fn write_data(path: &Path, len: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("data file"));
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        f.write_all(&buf[..n]).expect("writing data");
        left -= n as u64;
    }
    f.flush().expect("writing data");
}

/// Peak resident memory of a process, in MiB.
pub fn peak_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Poll `done` every 50 ms until it holds; panic after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request to a running node with a body of media type `ty`; panics unless it succeeds,
/// and returns the answer as JSON (null when it is not JSON).
pub fn request(
    node: &TestNode,
    method: reqwest::Method,
    path: &str,
    body: Option<Vec<u8>>,
    ty: &str,
) -> Value {
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client");
    let mut req = client
        .request(method, format!("{}{path}", node.api_url()))
        .header("content-type", ty);
    if let Some(t) = node.token() {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().expect("request");
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().unwrap_or(Value::Null)
}

/// A sample record as a LIMS (SENAITE) exports one: ten fields of ordinary size, as an
/// object of the bulk API (`type`, `id`, `fields`).
pub fn lims_sample(i: u64) -> Value {
    json!({"type": "Sample", "id": format!("S-{i:06}"), "fields": {
        "title": format!("Water sample {i} from station {}", i % 97),
        "client": format!("Client {}", i % 13),
        "sample_type": (["Seawater", "Sediment", "Plankton"][(i % 3) as usize]),
        "date_sampled": format!("2026-{:02}-{:02}T{:02}:00:00Z", 1 + i % 12, 1 + i % 28, i % 24),
        "depth_m": (i % 4_000) as f64 / 10.0,
        "latitude": -60.0 + (i % 1_200) as f64 / 10.0,
        "longitude": -170.0 + (i % 3_400) as f64 / 10.0,
        "analyses": ["Salinity", "Chlorophyll", "Nitrate"],
        "remarks": format!("Collected by CTD cast {}; kept at 4 C until analysis.", i / 24),
        "review_state": "sample_received",
    }})
}

/// An image annotation as an annotation server (BIIGLE) exports one: a shape's points, its
/// labels with their tree and the user who placed them.
pub fn annotation(i: u64) -> Value {
    let points: Vec<f64> = (0..2 * (3 + i % 6))
        .map(|k| ((i * 7_919 + k * 104_729) % 4_096) as f64 + 0.5)
        .collect();
    json!({"type": "Annotation", "id": format!("A-{i:06}"), "fields": {
        "image": format!("I-{:04}", i % 40),
        "shape": (["Point", "Circle", "Polygon", "Rectangle"][(i % 4) as usize]),
        "points": points,
        "labels": [{
            "label": format!("L-{}", i % 150),
            "label_tree": "Marine fauna (CATAMI 1.4)",
            "user": format!("U-{}", i % 9),
            "confidence": 0.5 + (i % 5) as f64 / 10.0,
            "created_at": format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + i % 28, i % 24, i % 60),
        }],
    }})
}
