//! PouchDB beside tidesync in one run (`bench side-by-side`, issue 17): installs PouchDB with
//! npm in `tests/pouchbench/` (never in CI), runs its driver on the same records and phases,
//! and prints the table with the ratios.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The PouchDB side's figures, as `tests/pouchbench/pouch.js` prints them.
#[derive(Debug, Clone, Default)]
pub struct PouchFigures {
    pub bulk_create_s: f64,
    pub initial_sync_s: f64,
    pub initial_sync_bytes: f64,
    pub idle_resync_ms: f64,
    pub idle_resync_bytes: f64,
    pub delta_reconnect_s: f64,
    pub delta_connected_s: f64,
    pub peak_a_mib: f64,
    pub peak_b_mib: f64,
}

/// Why the PouchDB side did not run.
#[derive(Debug, thiserror::Error)]
pub enum PouchError {
    #[error("Node.js is not installed (`node --version` failed), so PouchDB was not run")]
    NoNode,
    #[error("`npm install` in {dir} failed: {detail}")]
    Install { dir: PathBuf, detail: String },
    #[error("the PouchDB driver failed: {0}")]
    Driver(String),
}

/// The bench's own folder: `tests/pouchbench/`, beside this crate's sources.
pub fn folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pouchbench")
}

/// Run PouchDB 9 through the same phases with `objects` records, in `scratch`.
pub fn run(objects: usize, scratch: &Path) -> Result<PouchFigures, PouchError> {
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_ok {
        return Err(PouchError::NoNode);
    }
    let dir = folder();
    if !dir.join("node_modules/pouchdb").is_dir() {
        println!("installing PouchDB with npm in {}", dir.display());
        let out = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .map_err(|e| PouchError::Install {
                dir: dir.clone(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(PouchError::Install {
                dir,
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
    }
    let out = Command::new("node")
        .arg(dir.join("pouch.js"))
        .args(["--objects", &objects.to_string(), "--dir"])
        .arg(scratch)
        .output()
        .map_err(|e| PouchError::Driver(e.to_string()))?;
    if !out.status.success() {
        return Err(PouchError::Driver(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| PouchError::Driver(format!("no figures in its output: {text}")))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(PouchFigures {
        bulk_create_s: f("bulk_create_s"),
        initial_sync_s: f("initial_sync_s"),
        initial_sync_bytes: f("initial_sync_bytes"),
        idle_resync_ms: f("idle_resync_ms"),
        idle_resync_bytes: f("idle_resync_bytes"),
        delta_reconnect_s: f("delta_reconnect_s"),
        delta_connected_s: f("delta_connected_s"),
        peak_a_mib: f("peak_a_mib"),
        peak_b_mib: f("peak_b_mib"),
    })
}

/// One row of the side-by-side table.
pub struct Row {
    pub measure: String,
    /// PouchDB's figure, when it has one for this measure.
    pub pouch: Option<f64>,
    pub tidesync: f64,
    pub unit: &'static str,
    /// The target, in words.
    pub target: &'static str,
    /// The least `pouch / tidesync` that meets the target (lower figures are better in every
    /// row but the writers' rate), when the target is a ratio.
    pub want_ratio: Option<f64>,
    /// Bounds on tidesync's own figure that the target also sets, in `unit`.
    pub at_most: Option<f64>,
    pub at_least: Option<f64>,
}

/// Print the rows as a Markdown table: PouchDB, tidesync, how many times better tidesync is
/// (PouchDB's figure over tidesync's) and whether the ratio target is met.
pub fn print_table(rows: &[Row]) {
    println!("| Measure | PouchDB | tidesync | PouchDB / tidesync | Target | Met |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let pouch = r
            .pouch
            .map_or("—".to_string(), |p| format!("{} {}", fmt(p), r.unit));
        let ratio = r.pouch.map(|p| p / r.tidesync);
        let checks = [
            r.want_ratio.map(|want| ratio.is_some_and(|x| x >= want)),
            r.at_most.map(|max| r.tidesync <= max),
            r.at_least.map(|min| r.tidesync >= min),
        ];
        let met = if checks.iter().all(Option::is_none) {
            "—"
        } else if checks.iter().flatten().all(|ok| *ok) {
            "yes"
        } else {
            "no"
        };
        println!(
            "| {} | {pouch} | {} {} | {} | {} | {met} |",
            r.measure,
            fmt(r.tidesync),
            r.unit,
            ratio.map_or("—".to_string(), |x| format!("{x:.2}×")),
            r.target,
        );
    }
}

fn fmt(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}
