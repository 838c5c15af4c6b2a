//! The invariants, checked after the heal: every acknowledged write kept, every document a
//! policy lets through held alike on both ends, nothing a policy keeps back present, views
//! holding only published fields, signatures valid, and an idle resync moving nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value as Json};
use tidesync::core::DocAudit;
use tidesync_proto::NodeId;

use crate::options::{Violation, fail};
use crate::topology::{PUBLISHED_FIELD, Pass, Role, Topology};
use crate::world::World;

/// Every write acknowledged at node `i` is still in its store.
pub(crate) fn check_acked(w: &World, i: usize, phase: &str) -> Result<(), Violation> {
    let Some(core) = &w.nodes[i].core else {
        return Ok(());
    };
    let reader = core
        .store()
        .reader()
        .map_err(|e| fail(phase, e.to_string()))?;
    for (doc, hash) in &w.nodes[i].acked {
        let (Ok(d), Ok(h)) = (doc.parse(), hash.parse()) else {
            return Err(fail(
                phase,
                format!("node {i}: unparsable ack {doc} {hash}"),
            ));
        };
        if !reader
            .has_change(&d, &h)
            .map_err(|e| fail(phase, e.to_string()))?
        {
            return Err(fail(
                phase,
                format!("node {i} lost acknowledged change {hash} of document {doc}"),
            ));
        }
    }
    Ok(())
}

/// After the heal: every invariant.
pub(crate) fn check(w: &mut World) -> Result<(), Violation> {
    let phase = "check";
    let mut audits: Vec<BTreeMap<tidesync_proto::DocId, DocAudit>> = Vec::new();
    for i in 0..w.nodes.len() {
        check_acked(w, i, phase)?;
        let audit = w.nodes[i]
            .core
            .as_mut()
            .ok_or_else(|| fail(phase, format!("node {i} is not running")))?
            .audit()
            .map_err(|e| fail(phase, e.to_string()))?;
        audits.push(audit.into_iter().map(|a| (a.doc, a)).collect());
    }
    w.report.docs = audits.iter().map(BTreeMap::len).sum();
    if w.opts.files {
        crate::files::check(w, phase)?;
    }
    // Each node's equivocations: (document, author).
    let mut flagged: Vec<BTreeSet<(tidesync_proto::DocId, NodeId)>> = Vec::new();
    for i in 0..w.nodes.len() {
        let found = w.nodes[i]
            .core
            .as_ref()
            .map(|c| c.store().equivocations())
            .transpose()
            .map_err(|e| fail(phase, e.to_string()))?
            .unwrap_or_default();
        if !w.is_bad(i) {
            w.report.equivocations += found.len() as u64;
        }
        flagged.push(found.into_iter().map(|e| (e.doc, e.author)).collect());
    }
    let origin_of = |id: &NodeId| w.ids.get(id).copied();
    for (i, docs) in audits.iter().enumerate() {
        // The misbehaving node is not held to anything.
        if w.is_bad(i) {
            continue;
        }
        for a in docs.values() {
            let ty = a.record.ty.as_str();
            let origin = origin_of(&a.record.origin);
            // Every stored change has a valid signature.
            if let Some(bad) = a.changes.iter().find(|c| c.signature.is_err()) {
                return Err(fail(
                    phase,
                    format!(
                        "node {i} holds change {} of {ty}/{} whose signature does not verify: {:?}",
                        bad.hash, a.record.id, bad.signature
                    ),
                ));
            }
            // Nothing the policies keep from a node is there.
            check_kept(w, i, a, origin)?;
            // A lab's prefixed Samples are changed by that lab and the hub alone.
            if ty == "Sample"
                && let Some(o) = origin
                && w.layout.prefixes(0, o)
                && let Some(c) = a
                    .changes
                    .iter()
                    .find(|c| c.author != Some(w.node_id(o)) && c.author != Some(w.node_id(0)))
            {
                return Err(fail(
                    phase,
                    format!(
                        "node {i} holds lab {o}'s prefixed Sample/{} changed by {:?}, neither the lab nor the hub",
                        a.record.id, c.author
                    ),
                ));
            }
            // Read-only objects are changed by their owner alone.
            if ty == "Method"
                && let Some(c) = a.changes.iter().find(|c| c.author != Some(w.node_id(0)))
            {
                return Err(fail(
                    phase,
                    format!(
                        "node {i} holds read-only Method/{} changed by {:?}, not its owner node 0",
                        a.record.id, c.author
                    ),
                ));
            }
        }
    }
    // Every link between honest nodes passes what the policies let through, and both ends
    // then agree, on the document and on the equivocations found in it.
    for &(a, b) in &w.layout.links {
        if w.is_bad(a) || w.is_bad(b) {
            continue;
        }
        for (x, y) in [(a, b), (b, a)] {
            for d in audits[x].values() {
                let origin = origin_of(&d.record.origin);
                match w.layout.passes(x, y, d.record.ty.as_str(), origin) {
                    Pass::No => {}
                    Pass::Yes => {
                        let back = audits[y]
                            .get(&d.doc)
                            .map(|e| w.layout.passes(y, x, e.record.ty.as_str(), origin));
                        agree(x, y, d, audits[y].get(&d.doc), back == Some(Pass::Yes))?;
                        let of = |n: usize| {
                            flagged[n]
                                .iter()
                                .filter(|(doc, _)| *doc == d.doc)
                                .collect::<Vec<_>>()
                        };
                        if back == Some(Pass::Yes) && of(x) != of(y) {
                            return Err(fail(
                                phase,
                                format!(
                                    "nodes {x} and {y} exchange {}/{} ({}) but found different equivocations in it: {:?} vs {:?}",
                                    d.record.ty,
                                    d.record.local_id,
                                    d.doc,
                                    of(x),
                                    of(y)
                                ),
                            ));
                        }
                    }
                    Pass::View => check_view(w, x, y, d, &audits[y])?,
                }
            }
        }
    }
    // Nothing is left waiting for dependencies, and what waited was signed too. An
    // equivocator may withhold one side from a region of the world for good: there, what
    // depends on that side waits for ever, so only signatures are checked.
    let equivocator = w
        .opts
        .bad
        .is_some_and(|(_, m)| m == crate::options::Misbehaviour::Equivocate);
    for i in 0..w.nodes.len() {
        if w.is_bad(i) {
            continue;
        }
        let Some(core) = &w.nodes[i].core else {
            continue;
        };
        let held = core
            .store()
            .held_changes()
            .map_err(|e| fail(phase, e.to_string()))?;
        if let Some((h, c)) = held.iter().find(|(_, c)| c.verify().is_err()) {
            return Err(fail(
                phase,
                format!(
                    "node {i} holds a change of {}/{} ({}) whose signature does not verify: {:?}",
                    h.ty,
                    h.id,
                    h.doc,
                    c.verify().err()
                ),
            ));
        }
        if let (false, Some((h, _))) = (equivocator, held.first()) {
            return Err(fail(
                phase,
                format!(
                    "node {i} still holds {} changes waiting for dependencies, the first of {}/{} ({})",
                    held.len(),
                    h.ty,
                    h.id,
                    h.doc
                ),
            ));
        }
    }
    Ok(())
}

/// What the policies keep from node `i` is not there.
pub(crate) fn check_kept(
    w: &World,
    i: usize,
    a: &DocAudit,
    origin: Option<usize>,
) -> Result<(), Violation> {
    let ty = a.record.ty.as_str();
    let here = Some(i);
    let why = if ty == "Invoice" && origin != here {
        Some("Invoice is skipped on every link")
    } else if ty == "Sample"
        && matches!(w.layout.topology, Topology::Star | Topology::Ships)
        && i != 0
        && origin.is_some_and(|o| o != 0 && o != i)
    {
        Some("another collaborator's prefixed Sample goes back to its origin only")
    } else if origin.is_some_and(|o| w.layout.roles[o] == Role::Archive) && origin != here {
        Some("the archive only receives")
    } else if w.layout.roles[i] == Role::Archive
        && ty == "Template"
        // The archive takes Templates from its neighbour; that they are views is the
        // publisher's policy, which a misbehaving publisher ignores.
        && !w.neighbours(i).first().is_some_and(|&p| w.is_bad(p))
    {
        let publisher = w.neighbours(i).first().copied();
        if origin != publisher {
            Some("Template reaches the archive only as its neighbour's view")
        } else if a.json.keys().any(|k| k != PUBLISHED_FIELD)
            || a.changes
                .iter()
                .any(|c| c.author != origin.map(|o| w.node_id(o)))
        {
            Some("a view holds the published field alone, written by the publisher")
        } else {
            None
        }
    } else {
        None
    };
    match why {
        Some(why) => Err(fail(
            "check",
            format!(
                "node {i} holds {ty}/{} (created by node {origin:?}, fields {:?}): {why}",
                a.record.id,
                a.json.keys().collect::<Vec<_>>()
            ),
        )),
        None => Ok(()),
    }
}

/// The view that publisher `x` keeps of its document `d` for `y` is what `y` holds.
pub(crate) fn check_view(
    w: &World,
    x: usize,
    y: usize,
    d: &DocAudit,
    at_y: &BTreeMap<tidesync_proto::DocId, DocAudit>,
) -> Result<(), Violation> {
    let view_id = tidesync_proto::DocId::derive_view(
        &w.node_id(x),
        &w.node_id(y),
        &d.record.ty,
        &tidesync::model::view_name(&d.record.local_id),
    );
    let published: Map<String, Json> = d
        .json
        .iter()
        .filter(|(k, _)| k.as_str() == PUBLISHED_FIELD)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let ok = match at_y.get(&view_id) {
        None => d.deleted || published.is_empty(),
        Some(v) if d.deleted => v.deleted || v.json.is_empty(),
        Some(v) => !v.deleted && v.json == published,
    };
    if ok {
        return Ok(());
    }
    Err(fail(
        "check",
        format!(
            "node {y} holds view {:?} of node {x}'s {}/{} (deleted: {}, published: {published:?})",
            at_y.get(&view_id).map(|v| (&v.json, v.deleted)),
            d.record.ty,
            d.record.local_id,
            d.deleted
        ),
    ))
}
/// `y` holds all of `d` as `x` holds it; when the document passes back too, the two agree on
/// heads and JSON.
fn agree(
    x: usize,
    y: usize,
    d: &DocAudit,
    at_y: Option<&DocAudit>,
    both_ways: bool,
) -> Result<(), Violation> {
    let name = format!("{}/{} ({})", d.record.ty, d.record.local_id, d.doc);
    let Some(e) = at_y else {
        return Err(fail(
            "check",
            format!("node {y} lacks {name}, which node {x} holds and may send it"),
        ));
    };
    let theirs: BTreeSet<_> = e.changes.iter().map(|c| c.hash).collect();
    if let Some(c) = d.changes.iter().find(|c| !theirs.contains(&c.hash)) {
        return Err(fail(
            "check",
            format!(
                "node {y} lacks change {} of {name}, which node {x} holds",
                c.hash
            ),
        ));
    }
    if both_ways && (d.heads != e.heads || d.json != e.json || d.deleted != e.deleted) {
        return Err(fail(
            "check",
            format!(
                "nodes {x} and {y} disagree on {name}: {:?} deleted {} heads {:?} vs {:?} deleted {} heads {:?}",
                d.json, d.deleted, d.heads, e.json, e.deleted, e.heads
            ),
        ));
    }
    Ok(())
}

/// Every byte that crossed a budgeted link today was counted by its sender's durable meter
/// (which a crash keeps): the meter may count more (a step that failed after its batch was
/// counted), never less. The misbehaving node is held to nothing.
pub(crate) fn check_meters(w: &World, phase: &str) -> Result<(), Violation> {
    for (me, peer, crossed) in w.shaping.budgeted_today(w.now) {
        if w.is_bad(me) {
            continue;
        }
        let store = match (&w.nodes[me].core, &w.nodes[me].store) {
            (Some(core), _) => core.store(),
            (None, Some(store)) => store,
            (None, None) => continue,
        };
        let counted = store
            .meter(&w.node_id(peer))
            .map_err(|e| fail(phase, format!("node {me}: reading a meter: {e}")))?
            .on_day(w.now.div_euclid(tidesync::link::DAY_MS))
            .bytes;
        if counted < crossed {
            return Err(fail(
                phase,
                format!(
                    "node {me} sent {peer} {crossed} bytes today but its meter counts {counted}"
                ),
            ));
        }
    }
    Ok(())
}
