//! `bench side-by-side`: tidesync's phases and writers, then PouchDB's phases with the same
//! records in the same run, and issue 17's table with the ratios.

use tidesync_tests::pouch::{PouchFigures, Row, print_table};

use crate::single::writers;
use crate::sync::sync;

/// `bench side-by-side`: tidesync's phases, its writers, then PouchDB's phases with the same
/// records in the same run (when Node.js is present), and the table with the ratios.
pub(crate) fn side_by_side(objects: usize) {
    let t = sync(objects);
    let w = writers(16, 10);
    let scratch = tempfile::tempdir().expect("a scratch folder");
    println!(
        "PouchDB 9 (leveldb, no fsync), {objects} objects, two Node.js processes on 127.0.0.1"
    );
    let p = match tidesync_tests::pouch::run(objects, scratch.path()) {
        Ok(p) => Some(p),
        Err(e) => {
            println!("PouchDB not run: {e}");
            None
        }
    };
    let pf = |f: fn(&PouchFigures) -> f64| p.as_ref().map(f);
    let row = |measure: &str, pouch, tidesync, unit, target, want_ratio| Row {
        measure: measure.to_string(),
        pouch,
        tidesync,
        unit,
        target,
        want_ratio,
        at_most: None,
        at_least: None,
    };
    let at_most = |r: Row, max: f64| Row {
        at_most: Some(max),
        ..r
    };
    let at_least = |r: Row, min: f64| Row {
        at_least: Some(min),
        ..r
    };
    print_table(&[
        row(
            &format!("bulk create, {objects} objects"),
            pf(|p| p.bulk_create_s),
            t.bulk_create_s,
            "s",
            "no slower than PouchDB, durable",
            Some(1.0),
        ),
        at_least(
            row(
                "concurrent PUTs, 16 clients, per s",
                None,
                w.per_s,
                "/s",
                ">= 5,000 per s durable",
                None,
            ),
            5_000.0,
        ),
        at_most(
            row(
                "concurrent PUTs, 16 clients, p99",
                None,
                w.p99_ms,
                "ms",
                "p99 <= 20 ms",
                None,
            ),
            20.0,
        ),
        row(
            "initial sync A -> B",
            pf(|p| p.initial_sync_s),
            t.initial_sync_s,
            "s",
            ">= 6x faster",
            Some(6.0),
        ),
        row(
            "1 % delta after a reconnect",
            pf(|p| p.delta_reconnect_s),
            t.delta_reconnect_s,
            "s",
            ">= 5x faster",
            Some(5.0),
        ),
        row(
            "1 % delta while connected (500 edits)",
            pf(|p| p.delta_connected_s),
            t.delta_connected_s,
            "s",
            ">= 5x faster",
            Some(5.0),
        ),
        row(
            "idle resync, time",
            pf(|p| p.idle_resync_ms),
            t.idle_resync_ms,
            "ms",
            "keep",
            Some(1.0),
        ),
        row(
            "idle resync, bytes",
            pf(|p| p.idle_resync_bytes),
            t.idle_resync_bytes,
            "B",
            "keep",
            Some(1.0),
        ),
        at_most(
            row(
                "one change visible on a peer, p50",
                None,
                t.visible_p50_ms,
                "ms",
                "p50 <= 3 ms",
                None,
            ),
            3.0,
        ),
        at_most(
            row(
                "one change visible on a peer, p99",
                None,
                t.visible_p99_ms,
                "ms",
                "p99 <= 10 ms",
                None,
            ),
            10.0,
        ),
        at_most(
            row(
                "peak memory A",
                pf(|p| p.peak_a_mib),
                t.peak_a_mib,
                "MiB",
                "<= 100 MiB, below PouchDB",
                Some(1.0),
            ),
            100.0,
        ),
        at_most(
            row(
                "peak memory B",
                pf(|p| p.peak_b_mib),
                t.peak_b_mib,
                "MiB",
                "<= 100 MiB, below PouchDB",
                Some(1.0),
            ),
            100.0,
        ),
    ]);
    println!("writers' p50: {:.1} ms", w.p50_ms);
}
