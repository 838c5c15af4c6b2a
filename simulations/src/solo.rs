//! The single-node world: one node running the real core over an in-memory redb store, a random
//! workload of puts, deletes and reads, crashes that drop everything not committed, and the
//! invariants checked after every step.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use serde_json::{Map, Value as Json, json};
use tidesync::core::{Core, LocalWriteError, ReadError};

use crate::shell::start_core;
use crate::world::Trace;
use tidesync::identity::Identity;
use tidesync::replica::engine::WriteError;
use tidesync::store::Store;
use tidesync_proto::{ObjectId, TypeName};

/// Object types the workload writes.
const TYPES: [&str; 3] = ["Sample", "Method", "Volume"];
/// Distinct ids per type the workload draws from, so that objects are rewritten often.
const IDS_PER_TYPE: u32 = 12;
/// Documents the simulated node keeps in its cache: small, so that eviction is exercised.
const SIM_CACHE_DOCS: usize = 4;
/// Simulated milliseconds between steps.
const STEP_MS: i64 = 1_000;

/// What a world runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub steps: u32,
    /// Chance of a crash at each step, in thousandths.
    pub crash_per_mille: u32,
}

impl Options {
    /// The command that replays this world.
    pub fn command(&self) -> String {
        format!(
            "cargo run --release -p tidesync-sim -- --topology solo --seed {} --steps {} --crash-per-mille {}",
            self.seed, self.steps, self.crash_per_mille
        )
    }
}

/// What a finished world did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// FNV-1a 64 hash of every step's line of trace: equal traces give equal hashes.
    pub trace_hash: u64,
    pub writes_acked: u64,
    pub crashes: u64,
    pub live_objects: usize,
}

/// An invariant that failed, with the step where it did.
#[derive(Debug, thiserror::Error)]
#[error("step {step}: {what}")]
pub struct Violation {
    pub step: u32,
    pub what: String,
}

fn random_value(rng: &mut StdRng, depth: u32) -> Json {
    match rng.random_range(0..if depth > 1 { 5 } else { 7 }) {
        0 => json!(rng.random_range(-1000i64..1000)),
        1 => json!(format!("v{}", rng.random_range(0..50))),
        2 => json!(rng.random_bool(0.5)),
        3 => json!(f64::from(rng.random_range(0u32..1000)) / 8.0),
        4 => Json::Null,
        5 => Json::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let m: Map<String, Json> = (0..rng.random_range(0..4))
                .map(|i| (format!("k{i}"), random_value(rng, depth + 1)))
                .collect();
            Json::Object(m)
        }
    }
}

/// Run one world; `Err` names the first invariant that failed.
pub fn run(opts: &Options) -> Result<Report, Violation> {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    let identity = Identity::from_secret(secret);
    let clock = Arc::new(AtomicI64::new(1_700_000_000_000));
    let store = Store::in_memory().map_err(|e| Violation {
        step: 0,
        what: e.to_string(),
    })?;
    let start = |store: Store, epoch: u64| {
        start_core(
            "sim".into(),
            &identity,
            store,
            SIM_CACHE_DOCS,
            epoch,
            &clock,
        )
    };
    let mut core = start(store, rng.next_u64());
    // What every acknowledged write says each object must now be (None: deleted).
    let mut model: BTreeMap<(String, String), Option<Map<String, Json>>> = BTreeMap::new();
    let mut trace = Trace::new();
    let (mut writes_acked, mut crashes) = (0, 0);

    for step in 0..opts.steps {
        clock.fetch_add(STEP_MS, Ordering::SeqCst);
        let fail = |what: String| Violation { step, what };
        let ty_s = TYPES[rng.random_range(0..TYPES.len())];
        let id_s = format!("{}-{}", &ty_s[..1], rng.random_range(0..IDS_PER_TYPE));
        let (ty, id) = (
            TypeName::new(ty_s).map_err(|e| fail(e.to_string()))?,
            ObjectId::new(&id_s).map_err(|e| fail(e.to_string()))?,
        );
        let key = (ty_s.to_string(), id_s.clone());
        let roll = rng.random_range(0..1000u32);
        if roll < opts.crash_per_mille {
            // Crash: the cache and the engine's epoch are gone; only committed records remain.
            let store = core.into_store();
            core = start(store, rng.next_u64());
            crashes += 1;
            trace.line(&format!("{step} crash"));
            for ((t, i), want) in &model {
                check_object(&mut core, t, i, want.as_ref()).map_err(fail)?;
            }
            continue;
        }
        match roll % 10 {
            0..=6 => {
                let fields: Map<String, Json> = (0..rng.random_range(0..4))
                    .map(|_| {
                        (
                            format!("f{}", rng.random_range(0..6)),
                            random_value(&mut rng, 0),
                        )
                    })
                    .collect();
                let reply = core
                    .put(&ty, &id, &fields)
                    .map_err(|e| fail(format!("put {ty}/{id}: {e}")))?;
                let entry = model.entry(key).or_insert(None);
                let obj = entry.get_or_insert_with(Map::new);
                for (k, v) in &fields {
                    if v.is_null() {
                        obj.remove(k);
                    } else {
                        obj.insert(k.clone(), v.clone());
                    }
                }
                writes_acked += u64::from(reply.changed);
                trace.line(&format!(
                    "{step} put {ty}/{id} {:?} {:?}",
                    reply.seq, reply.hash
                ));
            }
            7 | 8 => {
                let result = core.delete(&ty, &id);
                let exists = matches!(model.get(&key), Some(Some(_)));
                match (result, exists) {
                    (Ok(reply), true) => {
                        model.insert(key, None);
                        writes_acked += 1;
                        trace.line(&format!("{step} delete {ty}/{id} {:?}", reply.seq));
                    }
                    (Err(LocalWriteError::Refused(WriteError::NotFound { .. })), false) => {
                        trace.line(&format!("{step} delete {ty}/{id} not-found"));
                    }
                    (other, exists) => {
                        return Err(fail(format!(
                            "delete {ty}/{id} (exists: {exists}) gave {other:?}"
                        )));
                    }
                }
            }
            _ => {
                let want = model.get(&key).cloned().flatten();
                check_object(&mut core, ty_s, &id_s, want.as_ref()).map_err(fail)?;
                trace.line(&format!("{step} get {ty}/{id}"));
            }
        }
    }

    // Final checks: every object matches, and every stored change of every object verifies.
    let last = opts.steps;
    for ((t, i), want) in &model {
        check_object(&mut core, t, i, want.as_ref())
            .map_err(|what| Violation { step: last, what })?;
        let (ty, id) = (
            TypeName::new(t.as_str()).map_err(|e| Violation {
                step: last,
                what: e.to_string(),
            })?,
            ObjectId::new(i.as_str()).map_err(|e| Violation {
                step: last,
                what: e.to_string(),
            })?,
        );
        let history = core.history(&ty, &id).map_err(|e| Violation {
            step: last,
            what: e.to_string(),
        })?;
        if let Some(bad) = history.changes.iter().find(|c| !c.verified) {
            return Err(Violation {
                step: last,
                what: format!(
                    "{t}/{i}: change {} does not verify: {:?}",
                    bad.hash, bad.error
                ),
            });
        }
    }
    Ok(Report {
        trace_hash: trace.0,
        writes_acked,
        crashes,
        live_objects: model.values().filter(|v| v.is_some()).count(),
    })
}

fn check_object(
    core: &mut Core,
    ty: &str,
    id: &str,
    want: Option<&Map<String, Json>>,
) -> Result<(), String> {
    let (t, i) = (
        TypeName::new(ty).map_err(|e| e.to_string())?,
        ObjectId::new(id).map_err(|e| e.to_string())?,
    );
    match (core.get(&t, &i), want) {
        (Ok(got), Some(want)) if &got == want => Ok(()),
        (Err(ReadError::NotFound { .. }), None) => Ok(()),
        (got, want) => Err(format!(
            "{ty}/{id}: node has {got:?}, acknowledged writes say {want:?}"
        )),
    }
}
