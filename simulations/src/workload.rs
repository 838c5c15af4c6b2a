//! The random workload: writes and deletes, forged changes, crashes' partners (partitions,
//! ships' voyages) and policy changes, each drawn from the world's seeded RNG.

use std::collections::BTreeSet;

use automerge::transaction::Transactable;
use automerge::{ActorId, ROOT};
use rand::{Rng, RngExt};
use serde_json::{Map, Value as Json, json};
use tidesync::core::LocalWriteError;
use tidesync_proto::{Checkpoint, DocHeader, Message, ObjectId, SignedChange, TypeName};

use crate::options::{Violation, fail};
use crate::shell;
use crate::topology::{PUBLISHED_FIELD, Role, TYPES};
use crate::world::World;

/// Distinct ids per type the workload draws new names from, so that names collide across
/// nodes and objects are rewritten often.
const IDS_PER_TYPE: u32 = 8;
/// Fields the workload writes.
const FIELDS: [&str; 5] = [PUBLISHED_FIELD, "status", "owner", "qty", "note"];

/// Ships leave the hub for long stretches: a voyage of a fifth to half of the run.
pub(crate) fn ships_sail(w: &mut World, step: u32) {
    for l in 0..w.net.links.len() {
        let ship = w.net.links[l].b;
        if w.layout.roles[ship] == Role::Ship
            && step >= w.net.links[l].down_until
            && w.rng.random_range(0..1000) < 10
        {
            let voyage = w
                .rng
                .random_range(w.opts.steps / 5..=w.opts.steps / 2)
                .max(1);
            w.net.links[l].down_until = step + voyage;
            w.trace
                .line(&format!("{} ship {ship} sails for {voyage} steps", w.now));
        }
    }
}

/// Cut a random set of nodes off from the rest for a while.
pub(crate) fn partition(w: &mut World, step: u32) {
    let side: BTreeSet<usize> = (0..w.nodes.len())
        .filter(|_| w.rng.random_bool(0.5))
        .collect();
    let until = step + w.rng.random_range(5..=60);
    for link in &mut w.net.links {
        if side.contains(&link.a) != side.contains(&link.b) {
            link.down_until = link.down_until.max(until);
        }
    }
    w.report.partitions += 1;
    w.trace
        .line(&format!("{} partition {side:?} until {until}", w.now));
}

/// Set node `me`'s policy for `peer` from the layout and what is narrowed now; a widening
/// backfills (through the core, as `tidesync peer set` does on a running node).
pub(crate) fn apply_policy(
    w: &mut World,
    me: usize,
    peer: usize,
    phase: &str,
) -> Result<(), Violation> {
    let policy = w.policy(me, peer);
    let (id, name) = (w.node_id(peer), w.layout.name(peer));
    let Some(core) = w.nodes[me].core.as_mut() else {
        return Ok(());
    };
    let widened = core
        .set_policy(id, name, policy)
        .map_err(|e| fail(phase, format!("node {me}: setting a policy: {e}")))?;
    if widened {
        let out = core.on_policy_widened(id);
        shell::route(w, me, out, phase)?;
    }
    Ok(())
}

/// Narrow or widen `Volume` on one side of a random link while the world runs.
pub(crate) fn change_policy(w: &mut World, phase: &str) -> Result<(), Violation> {
    let l = w.rng.random_range(0..w.net.links.len());
    let (a, b) = (w.net.links[l].a, w.net.links[l].b);
    let (me, peer) = if w.rng.random_bool(0.5) {
        (a, b)
    } else {
        (b, a)
    };
    let narrowing = w.narrowed.insert((me, peer));
    if !narrowing {
        w.narrowed.remove(&(me, peer));
    }
    w.report.policy_changes += 1;
    let stopped = w.nodes[me].core.is_none();
    w.trace.line(&format!(
        "{} policy {me} for {peer}: Volume {}{}",
        w.now,
        if narrowing { "skipped" } else { "restored" },
        if stopped {
            " (stopped: config edited)"
        } else {
            ""
        }
    ));
    // A stopped node's config changes alone, as an edit of its config file does; its
    // store compares the policy with the one it last applied when the node starts again.
    apply_policy(w, me, peer, phase)
}

/// A random write at a random running node: a new or named object, an edit of one it
/// holds (so that nodes edit the same fields concurrently), or a delete.
pub(crate) fn write(w: &mut World, phase: &str) -> Result<(), Violation> {
    let i = w.rng.random_range(0..w.nodes.len());
    if w.nodes[i].core.is_none() {
        return Ok(());
    }
    let mut ty_s = TYPES[w.rng.random_range(0..TYPES.len())];
    if !w.layout.writes(i, ty_s) && !w.layout.refuses_write(i, ty_s) {
        ty_s = "Sample";
    }
    if ty_s == "Template" && w.layout.roles[i] == Role::Archive {
        // The archive only ever holds the views it is sent (see `topology`).
        ty_s = "Volume";
    }
    let ty = TypeName::new(ty_s).map_err(|e| fail(phase, e.to_string()))?;
    let id = pick_id(w, i, &ty, phase)?;
    let delete = w.rng.random_range(0..100) < 12;
    let mut fields: Map<String, Json> = (0..w.rng.random_range(1..=3))
        .map(|_| {
            let f = FIELDS[w.rng.random_range(0..FIELDS.len())];
            let v = match w.rng.random_range(0..5) {
                0 => Json::Null,
                1 => json!(w.rng.random_range(0..100)),
                _ => json!(format!("v{}", w.rng.random_range(0..20))),
            };
            (f.to_string(), v)
        })
        .collect();
    if w.opts.files
        && !delete
        && w.rng.random_range(0..crate::files::ATTACH_ONE_IN) == 0
        && let Some((field, value)) = crate::files::attach(w, i, ty_s, phase)?
    {
        fields.insert(field, value);
    }
    let Some(core) = w.nodes[i].core.as_mut() else {
        return Ok(());
    };
    let result = if delete {
        core.delete(&ty, &id)
    } else {
        core.put(&ty, &id, &fields)
    };
    // A node ignoring its own policy writes read-only types; its peers refuse the changes.
    let ignores = w
        .opts
        .bad
        .is_some_and(|(b, m)| b == i && m == crate::options::Misbehaviour::IgnorePolicy);
    let refused = w.layout.refuses_write(i, ty_s) && !ignores;
    match result {
        Ok(reply) if refused => {
            return Err(fail(
                phase,
                format!("node {i} accepted a local write to read-only {ty}/{id}: {reply:?}"),
            ));
        }
        Ok(reply) => {
            if let (true, Some(hash)) = (reply.changed, reply.hash) {
                w.trace.line(&format!(
                    "{} write {i} {ty}/{id} {hash} seq {:?}",
                    w.now, reply.seq
                ));
                w.nodes[i].acked.push((reply.doc, hash));
                w.report.writes_acked += 1;
            }
        }
        Err(LocalWriteError::ReadOnly { .. }) if refused => {
            w.report.writes_refused += 1;
        }
        Err(LocalWriteError::Refused(_)) if delete => {}
        Err(e) => return Err(fail(phase, format!("node {i}: write {ty}/{id}: {e}"))),
    }
    let out = match w.nodes[i].core.as_mut() {
        Some(core) => core.pump_all(),
        None => Ok(()),
    };
    shell::route(w, i, out, phase)
}

/// A name at node `i`: one of its objects of `ty` half the time, else one from the pool.
pub(crate) fn pick_id(
    w: &mut World,
    i: usize,
    ty: &TypeName,
    phase: &str,
) -> Result<ObjectId, Violation> {
    if w.rng.random_bool(0.5)
        && let Some(core) = &w.nodes[i].core
    {
        let page = core
            .list(ty, None, 64)
            .map_err(|e| fail(phase, e.to_string()))?;
        if !page.ids.is_empty() {
            let k = w.rng.random_range(0..page.ids.len());
            return ObjectId::new(page.ids[k].as_str()).map_err(|e| fail(phase, e.to_string()));
        }
    }
    let n = w.rng.random_range(0..IDS_PER_TYPE);
    ObjectId::new(format!("{}-{n}", &ty.as_str()[..1])).map_err(|e| fail(phase, e.to_string()))
}

/// A running node sends a connected peer a change it forged: a new change to one of its
/// documents whose actor is another node's key, signed with its own. The peer must reject
/// it (the signature invariant catches one that is stored).
pub(crate) fn forge(w: &mut World, phase: &str) -> Result<(), Violation> {
    let l = w.rng.random_range(0..w.net.links.len());
    let link = &w.net.links[l];
    if link.conn.is_none() {
        return Ok(());
    }
    let (f, g) = if w.rng.random_bool(0.5) {
        (link.a, link.b)
    } else {
        (link.b, link.a)
    };
    let ty =
        TypeName::new(TYPES[w.rng.random_range(0..3)]).map_err(|e| fail(phase, e.to_string()))?;
    let (victim, epoch) = (w.node_id(g), w.rng.next_u64());
    let (Some(fc), Some(_)) = (&w.nodes[f].core, &w.nodes[g].core) else {
        return Ok(());
    };
    let page = fc
        .list(&ty, None, 64)
        .map_err(|e| fail(phase, e.to_string()))?;
    if page.ids.is_empty() {
        return Ok(());
    }
    let name = &page.ids[w.rng.random_range(0..page.ids.len())];
    let name = ObjectId::new(name.as_str()).map_err(|e| fail(phase, e.to_string()))?;
    let Some((doc_id, rec)) = fc
        .find(&ty, &name)
        .map_err(|e| fail(phase, e.to_string()))?
    else {
        return Ok(());
    };
    let Some(doc) = fc
        .document(&doc_id)
        .map_err(|e| fail(phase, e.to_string()))?
    else {
        return Ok(());
    };
    let actor = tidesync_proto::ids::actor_id(&victim, epoch);
    let Some((header, signed)) = craft(doc, doc_id, rec, actor, fc.identity(), "forged", phase)?
    else {
        return Ok(());
    };
    inject(w, f, g, header, signed, phase)?;
    w.report.forgeries += 1;
    w.trace
        .line(&format!("{} forge {f}->{g} as {victim} on {doc_id}", w.now));
    Ok(())
}

/// A change to `doc` (of record `rec`) made as `actor`, setting `status` to `value`, signed
/// with `key`: what a misbehaving node sends. With the header naming the document.
pub(crate) fn craft(
    mut doc: automerge::Automerge,
    doc_id: tidesync_proto::DocId,
    rec: tidesync::model::DocRecord,
    actor: Vec<u8>,
    key: &tidesync::identity::Identity,
    value: &str,
    phase: &str,
) -> Result<Option<(DocHeader, SignedChange)>, Violation> {
    doc.set_actor(ActorId::from(actor));
    let mut tx = doc.transaction();
    tx.put(ROOT, "status", value)
        .map_err(|e| fail(phase, e.to_string()))?;
    tx.commit();
    let Some(change) = doc.get_last_local_change() else {
        return Ok(None);
    };
    let signed = SignedChange::sign(key.signing_key(), doc_id, &change);
    let header = DocHeader {
        doc: doc_id,
        origin: rec.origin,
        ty: rec.ty,
        id: rec.id,
    };
    Ok(Some((header, signed)))
}

/// Node `f` sends `g` one crafted change of the document `header` names, in a batch that
/// claims no stretch of `f`'s log, so that `g`'s checkpoint of `f` stays where it is.
pub(crate) fn inject(
    w: &mut World,
    f: usize,
    g: usize,
    header: DocHeader,
    signed: SignedChange,
    phase: &str,
) -> Result<(), Violation> {
    let (Some(fc), Some(gc)) = (&w.nodes[f].core, &w.nodes[g].core) else {
        return Ok(());
    };
    let held: Checkpoint = gc
        .store()
        .peer(&w.node_id(f))
        .map_err(|e| fail(phase, e.to_string()))?
        .received;
    let tip = fc
        .store()
        .last_seq()
        .map_err(|e| fail(phase, e.to_string()))?;
    let msg = Message::Changes {
        // A number no real batch of the forger's session has, so its Ack matches nothing.
        batch: u64::MAX,
        // Claims no stretch of the forger's log (nothing is after the last SEQ), so the
        // receiver's checkpoint stays where it is.
        after: u64::MAX,
        docs: vec![header],
        changes: vec![signed],
        upto: held,
        tip,
    };
    w.net.request(&mut w.rng, w.now, f, g, msg);
    Ok(())
}
