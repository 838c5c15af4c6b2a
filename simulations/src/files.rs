//! Files in a simulated world: writes that attach a file (stored at the writer first, as
//! `put --file` does), each node's fetcher asking its peers for segments, served and verified
//! through the nodes' real stores over the simulated links (a misbehaving node serves them
//! corrupted), and the file invariants checked after the heal.

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use serde_json::{Value as Json, json};
use tidesync::files::FileHash;
use tidesync::sync::fetch::Outcome;
use tidesync_proto::files::FileAsk;

use crate::options::{Violation, fail};
use crate::topology::PUBLISHED_FIELD;
use crate::world::World;

/// One write in this many attaches a file, in a world with files.
pub const ATTACH_ONE_IN: u32 = 6;
/// Most bytes of a small attached file; one in four is larger, of up to
/// [`MAX_LARGE_FILE_BYTES`], so that files of several segments move too.
pub const MAX_SMALL_FILE_BYTES: usize = 48 * 1024;
pub const MAX_LARGE_FILE_BYTES: usize = 5 * 1024 * 1024 / 2;
/// Rounds after the records settle in which every allowed file must arrive.
pub const MAX_FILE_ROUNDS: u32 = 400;
/// Simulated milliseconds per file round.
const FILE_ROUND_MS: i64 = 1_000;

/// Store a new file at node `i` for a write of `ty`, as `put --file` does before the change:
/// the field and the reference to put in it.
pub(crate) fn attach(
    w: &mut World,
    i: usize,
    ty: &str,
    phase: &str,
) -> Result<Option<(String, Json)>, Violation> {
    let size = if w.rng.random_range(0..4) == 0 {
        w.rng
            .random_range(MAX_SMALL_FILE_BYTES..=MAX_LARGE_FILE_BYTES)
    } else {
        w.rng.random_range(1..=MAX_SMALL_FILE_BYTES)
    };
    let mut bytes = vec![0u8; size];
    StdRng::seed_from_u64(w.rng.next_u64()).fill_bytes(&mut bytes);
    let field = if w.rng.random_bool(0.5) {
        PUBLISHED_FIELD
    } else {
        "attachment"
    };
    let Some(core) = w.nodes[i].core.as_ref() else {
        return Ok(None);
    };
    let (hash, size) = core
        .store()
        .add_file(&mut &bytes[..], w.now)
        .map_err(|e| fail(phase, format!("node {i}: storing a file: {e}")))?;
    w.files.local.entry(i).or_default().insert(hash);
    if ty == "Template" && field != PUBLISHED_FIELD {
        w.files.hidden.insert(hash);
    }
    w.report.files_added += 1;
    w.trace.line(&format!(
        "{} attach {i} {} {size} in {field}",
        w.now,
        short(&hash)
    ));
    Ok(Some((
        field.to_string(),
        json!({"$file": hash.to_string(), "size": size}),
    )))
}

fn short(hash: &FileHash) -> String {
    hash.to_string()[..8].to_string()
}

/// One round of file transfer: every running node asks for the segments its fetcher wants
/// now; each ask crosses its link (or is lost with it), is served by the peer's real store
/// if its policy lets the file go, and is verified and written by the asker's; complete
/// downloads move into place, and progress is saved, as the daemon does.
pub(crate) fn exchange(w: &mut World, phase: &str) -> Result<(), Violation> {
    for i in 0..w.nodes.len() {
        let asks = match w.nodes[i].core.as_mut() {
            Some(core) => core.file_asks(w.now),
            None => continue,
        };
        for (peer, ask) in asks {
            let Some(&j) = w.ids.get(&peer) else {
                return Err(fail(phase, format!("node {i} asked unknown {peer}")));
            };
            let outcome = serve(w, i, j, &ask, phase)?;
            w.trace.line(&format!(
                "{} file {i}<-{j} {} seg {} {}",
                w.now,
                short(&FileHash(ask.hash)),
                ask.segment,
                match &outcome {
                    Outcome::Verified { .. } => "verified",
                    Outcome::Corrupt(_) => "corrupt",
                    Outcome::Unknown => "unknown",
                    Outcome::Busy => "busy",
                    Outcome::Failed(_) => "failed",
                    Outcome::Local(_) => "local",
                }
            ));
            if let Outcome::Local(e) = &outcome {
                return Err(fail(phase, format!("node {i}: storing a segment: {e}")));
            }
            if let Some(core) = w.nodes[i].core.as_mut() {
                core.file_answered(peer, &ask, outcome, w.now);
            }
        }
        let Some(core) = w.nodes[i].core.as_mut() else {
            continue;
        };
        for (hash, size) in core.files_complete() {
            let result = core.store().finish_download(&hash, size, w.now);
            if let Err(e) = &result {
                return Err(fail(phase, format!("node {i}: storing file {hash}: {e}")));
            }
            w.trace
                .line(&format!("{} stored {i} {}", w.now, short(&hash)));
            core.file_finished(&hash, result, w.now);
        }
        core.save_file_progress()
            .and_then(|()| core.reconcile_wants())
            .map_err(|e| fail(phase, format!("node {i}: the want-list: {e}")))?;
    }
    Ok(())
}

/// Node `j` answers node `i`'s ask, and node `i` checks the answer.
fn serve(
    w: &mut World,
    i: usize,
    j: usize,
    ask: &FileAsk,
    phase: &str,
) -> Result<Outcome, Violation> {
    let up = w
        .net
        .link_between(i, j)
        .is_some_and(|l| w.net.links[l].conn.is_some());
    if !up || w.nodes[j].core.is_none() {
        return Ok(Outcome::Failed("not connected".into()));
    }
    if w.rng.random_range(0..1000) < w.net.faults.drop_per_mille {
        return Ok(Outcome::Failed("lost".into()));
    }
    let asker = w.node_id(i);
    let bad = w.is_bad(j);
    let Some(core) = w.nodes[j].core.as_mut() else {
        return Ok(Outcome::Failed("not connected".into()));
    };
    let may = core
        .may_serve_file(asker, ask)
        .map_err(|e| fail(phase, format!("node {j}: checking a file ask: {e}")))?;
    if !may {
        return Ok(Outcome::Unknown);
    }
    let Some(granted) = core.grant_segment(asker, ask) else {
        return Ok(Outcome::Busy);
    };
    let encoded = core
        .store()
        .encode_segment(ask)
        .map_err(|e| fail(phase, format!("node {j}: serving a segment: {e}")))?;
    let Some(mut encoded) = encoded else {
        return Ok(Outcome::Unknown);
    };
    core.file_served(asker, encoded.len() as u64, granted);
    if bad && !encoded.is_empty() {
        // A misbehaving node serves every segment with one bit flipped.
        let at = w.rng.random_range(0..encoded.len());
        encoded[at] ^= 1;
    }
    let Some(core) = w.nodes[i].core.as_ref() else {
        return Ok(Outcome::Failed("the asker stopped".into()));
    };
    let hash = FileHash(ask.hash);
    Ok(
        match core
            .store()
            .decode_segment(&hash, ask.size, ask.segment, &encoded)
        {
            Ok(v) => Outcome::Verified { bytes: v.bytes },
            Err(tidesync::store::SegmentError::Corrupt { detail, .. }) => Outcome::Corrupt(detail),
            Err(tidesync::store::SegmentError::Local(e)) => Outcome::Local(e.to_string()),
        },
    )
}

/// The honest nodes that are running, with their cores.
fn honest(w: &World) -> impl Iterator<Item = (usize, &tidesync::core::Core)> {
    (0..w.nodes.len())
        .filter(|i| !w.is_bad(*i))
        .filter_map(|i| w.nodes[i].core.as_ref().map(|c| (i, c)))
}

/// Wanted files at honest nodes that an honest neighbour holds and may serve them: each one
/// should arrive. As (node, file).
fn due(w: &World, phase: &str) -> Result<Vec<(usize, FileHash)>, Violation> {
    let mut out = Vec::new();
    for (i, core) in honest(w) {
        let wants = core
            .store()
            .wants()
            .map_err(|e| fail(phase, format!("node {i}: reading the want-list: {e}")))?;
        for want in wants {
            let ask = FileAsk {
                hash: want.hash.0,
                size: want.size,
                segment: 0,
            };
            for j in w.neighbours(i) {
                let Some(other) = w.nodes[j].core.as_ref().filter(|_| !w.is_bad(j)) else {
                    continue;
                };
                if other
                    .may_serve_file(w.node_id(i), &ask)
                    .map_err(|e| fail(phase, e.to_string()))?
                {
                    out.push((i, want.hash));
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// After the records settled: file rounds until every file due has arrived; how many rounds.
pub(crate) fn settle(w: &mut World, phase: &str) -> Result<u32, Violation> {
    let mut rounds = 0;
    while !due(w, phase)?.is_empty() && rounds < MAX_FILE_ROUNDS {
        rounds += 1;
        w.now += FILE_ROUND_MS;
        w.clock.store(w.now, std::sync::atomic::Ordering::SeqCst);
        crate::shell::deliver(w, phase)?;
        exchange(w, phase)?;
    }
    Ok(rounds)
}

/// The file invariants, at every honest node after the heal:
/// - every file an honest neighbour may serve it and its objects refer to has arrived;
/// - every stored file matches its hash;
/// - none arrived that the policies refuse: a file it did not store itself came over a link
///   that carries files of its size, and an archive holds no file attached to a `Template`
///   outside the field its views publish.
pub(crate) fn check(w: &mut World, phase: &str) -> Result<(), Violation> {
    if let Some((i, hash)) = due(w, phase)?.first() {
        return Err(fail(
            phase,
            format!(
                "node {i} still wants file {hash}, which an honest neighbour holds and may serve it, {MAX_FILE_ROUNDS} file rounds after the heal"
            ),
        ));
    }
    let mut stored = 0;
    for (i, core) in honest(w) {
        let files = core
            .store()
            .files()
            .map_err(|e| fail(phase, e.to_string()))?;
        stored += files.len() as u64;
        let local = w.files.local.get(&i);
        for (hash, row) in files {
            if !core
                .store()
                .verify_file(&hash)
                .map_err(|e| fail(phase, e.to_string()))?
            {
                return Err(fail(
                    phase,
                    format!("node {i} stores file {hash}, whose bytes do not match its hash"),
                ));
            }
            if local.is_some_and(|l| l.contains(&hash)) {
                continue;
            }
            if !w
                .neighbours(i)
                .into_iter()
                .any(|j| w.layout.file_passes(j, i, row.size))
            {
                return Err(fail(
                    phase,
                    format!(
                        "node {i} holds file {hash} of {} bytes, which no link of its carries",
                        row.size
                    ),
                ));
            }
            if w.layout.roles[i] == crate::topology::Role::Archive && w.files.hidden.contains(&hash)
            {
                return Err(fail(
                    phase,
                    format!(
                        "archive {i} holds file {hash}, which only a field its views hide referred to"
                    ),
                ));
            }
        }
    }
    w.report.files_stored = stored;
    Ok(())
}
