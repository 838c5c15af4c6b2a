//! Exporting a bundle for a peer and importing one: the same policy, verification and
//! checkpoint rules as a sync over the network, over the replica.

use std::collections::{HashMap, HashSet};

use tidesync_proto::{DocHeader, DocId, NodeId};

use super::stream::{Opened, open_stream};
use super::{BundleBody, BundleError, BundleFile, ExportReport, ImportReport, MAX_BUNDLE_FILES};
use crate::model::Claim;
use crate::replica::Replica;
use crate::replica::outbound::SYNC_BATCH_CHANGES;
use crate::store::StoreError;

fn bundle_store_err(peer: NodeId) -> impl FnOnce(StoreError) -> BundleError {
    move |source| BundleError::Store { peer, source }
}

/// The body of a bundle for the configured peer `name`: everything our policy for it lets out
/// that it has not acknowledged (or, with `all`, everything the policy lets out); with
/// `with_files`, the files it lacks that those objects refer to, or that its last bundle said
/// it wants, where our policy lets them go; and the files we want from it. `progress` is told
/// the changes gathered so far. The bundle itself is written by [`super::stream::write`].
pub fn export_body(
    replica: &mut Replica,
    name: &str,
    all: bool,
    with_files: bool,
    progress: &dyn Fn(u64),
) -> Result<(BundleBody, ExportReport), BundleError> {
    let peer = replica
        .policies()
        .named(name)
        .ok_or_else(|| BundleError::UnknownPeer { name: name.into() })?;
    let err = bundle_store_err(peer);
    let record = replica.store().peer(&peer).map_err(err)?;
    let last = replica.store().last_seq().map_err(bundle_store_err(peer))?;
    let after = if all { 0 } else { record.acked.min(last) };
    let mut by_ref = replica.carried_to(peer)?;
    let (mut docs, mut changes) = (Vec::new(), Vec::new());
    let mut headed = HashSet::new();
    let mut cursor = after;
    // What the peer acknowledged ahead of log order it holds already (`all` sends it too).
    let ahead = if all {
        Default::default()
    } else {
        replica
            .store()
            .sent_ahead(&peer)
            .map_err(bundle_store_err(peer))?
    };
    while cursor < last {
        let batch = replica.read_for(peer, cursor, false, &mut by_ref, &ahead)?;
        if batch.upto.seq <= cursor {
            break;
        }
        cursor = batch.upto.seq;
        docs.extend(batch.docs.into_iter().filter(|h| headed.insert(h.doc)));
        changes.extend(batch.changes);
        progress(changes.len() as u64);
    }
    let upto = replica
        .checkpoint_for(&peer, cursor)
        .map_err(bundle_store_err(peer))?
        .unwrap_or_default();
    let files = if with_files {
        files_for(replica, peer, &docs)?
    } else {
        Vec::new()
    };
    let wants: Vec<BundleFile> = replica
        .store()
        .wants()
        .map_err(bundle_store_err(peer))?
        .into_iter()
        .filter(|w| w.sources.contains(&peer))
        .map(|w| BundleFile {
            hash: w.hash,
            size: w.size,
        })
        .take(MAX_BUNDLE_FILES)
        .collect();
    let body = BundleBody {
        from: replica.node_id(),
        to: peer,
        created_ms: replica.now_ms(),
        after,
        upto,
        holds: record.received,
        docs,
        changes,
        files,
        wants,
    };
    let report = ExportReport {
        peer: name.to_string(),
        documents: body.docs.len() as u64,
        changes: body.changes.len() as u64,
        after,
        upto: upto.seq,
        encrypted: false,
        bytes: 0,
        files: body.files.len() as u64,
        file_bytes: body.files.iter().map(|f| f.size).sum(),
        wants: body.wants.len() as u64,
    };
    Ok((body, report))
}

/// The files a bundle for `peer` carries: those the objects in it refer to, then those the
/// peer's last bundle said it lacks; each only if stored here and our policy lets the peer
/// have it (as for a file it asked for over the network).
fn files_for(
    replica: &Replica,
    peer: NodeId,
    docs: &[DocHeader],
) -> Result<Vec<BundleFile>, BundleError> {
    let store = replica.store();
    let mut candidates = Vec::new();
    for h in docs {
        candidates.extend(store.doc_files(&h.doc).map_err(bundle_store_err(peer))?);
    }
    candidates.extend(store.peer_lacks(&peer).map_err(bundle_store_err(peer))?);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (hash, size) in candidates {
        if out.len() >= MAX_BUNDLE_FILES {
            break;
        }
        if seen.insert(hash)
            && replica
                .may_serve_file(peer, &hash, size)
                .map_err(bundle_store_err(peer))?
        {
            out.push(BundleFile { hash, size });
        }
    }
    Ok(out)
}

/// Open a bundle from `src` addressed to this node from a configured peer (see
/// [`open_stream`]): its records checked, its files still to be read.
pub fn open_from<'a>(
    replica: &Replica,
    src: impl std::io::Read + Send + 'a,
) -> Result<Opened<'a>, BundleError> {
    let policies = &replica.policies();
    open_stream(replica.identity(), src, |n| policies.name_of(n).is_some()).map_err(|e| match e {
        BundleError::UnknownExporter { from } if policies.is_revoked(&from) => {
            BundleError::RevokedExporter { from }
        }
        other => other,
    })
}

/// Import the records of an opened bundle (see [`open_from`]): every change is verified and
/// checked against our policy for the exporter, exactly as if it came over the network, and
/// stored in batches; the exporter's checkpoint moves to the bundle's end when nothing before
/// it is missing, so the next sync carries only what the bundle did not; the files it says it
/// wants are recorded for our next bundle to it. With `dry_run` nothing is written. Records that
/// fail any check refuse the bundle whole. Its files are stored after, by
/// [`super::files::store_wanted`], once the want-list knows which this node wants.
pub fn import_body(
    replica: &mut Replica,
    body: &BundleBody,
    dry_run: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<ImportReport, BundleError> {
    let peer = body.from;
    let mut report = ImportReport {
        peer: replica
            .policies()
            .name_of(&peer)
            .unwrap_or_default()
            .to_string(),
        from: peer.to_string(),
        dry_run,
        files: body.files.len() as u64,
        ..ImportReport::default()
    };
    let fresh = classify(replica, body, &mut report)?;
    let record = replica
        .store()
        .peer(&peer)
        .map_err(bundle_store_err(peer))?;
    let moves = record.received.seq < body.upto.seq;
    if dry_run {
        return Ok(report);
    }
    let lacks: Vec<_> = body.wants.iter().map(|f| (f.hash, f.size)).collect();
    replica
        .store()
        .set_peer_lacks(&peer, &lacks)
        .map_err(bundle_store_err(peer))?;
    if fresh == 0 && !moves {
        return Ok(report);
    }
    // Stored in batches, one transaction each; only the last claims the bundle's stretch
    // of the exporter's log, once everything before it is stored.
    let total = body.changes.len() as u64;
    let headers: HashMap<DocId, &DocHeader> = body.docs.iter().map(|h| (h.doc, h)).collect();
    let n = body.changes.len().div_ceil(SYNC_BATCH_CHANGES).max(1);
    let (mut done, mut held, mut rejected) = (0, 0, 0);
    for i in 0..n {
        let start = i * SYNC_BATCH_CHANGES;
        let chunk =
            body.changes[start..(start + SYNC_BATCH_CHANGES).min(body.changes.len())].to_vec();
        // The headers of this part's documents only.
        let mut headed = HashSet::new();
        let docs: Vec<DocHeader> = chunk
            .iter()
            .filter(|c| headed.insert(c.doc))
            .filter_map(|c| headers.get(&c.doc).map(|h| (*h).clone()))
            .collect();
        let claim = (i + 1 == n).then_some(Claim {
            after: body.after,
            upto: body.upto,
            restart: false,
        });
        done += chunk.len() as u64;
        let r = replica.receive_changes(peer, claim, docs, chunk, None)?;
        held += r.held;
        rejected += r.rejected;
        progress(done, total);
    }
    report.held = held;
    report.rejected = report.rejected.max(rejected);
    // The receipt: how far the exporter holds our log, if that is our log.
    if body.holds.seq > 0
        && replica
            .checkpoint_for(&peer, body.holds.seq)
            .map_err(bundle_store_err(peer))?
            == Some(body.holds)
    {
        replica
            .store()
            .update_peer(&peer, |r| r.acked = r.acked.max(body.holds.seq))
            .map_err(bundle_store_err(peer))?;
    }
    Ok(report)
}

/// Count what `body` adds, updates, duplicates and has refused here; returns the number of
/// changes new to this node.
fn classify(
    replica: &Replica,
    body: &BundleBody,
    report: &mut ImportReport,
) -> Result<u64, BundleError> {
    let peer = body.from;
    let headers: HashMap<DocId, &DocHeader> = body.docs.iter().map(|h| (h.doc, h)).collect();
    let reader = replica.store().reader().map_err(bundle_store_err(peer))?;
    let (mut added, mut updated) = (HashSet::new(), HashSet::new());
    let mut seen = HashSet::new();
    // By the same rule, and as fast, as a received sync batch is verified.
    for verified in crate::replica::receive::verify_batch(&body.changes, replica.faults()) {
        let Ok(v) = verified else {
            report.rejected += 1;
            continue;
        };
        if !seen.insert((v.doc, v.hash))
            || reader
                .has_change(&v.doc, &v.hash)
                .map_err(bundle_store_err(peer))?
        {
            report.duplicates += 1;
            continue;
        }
        let record = reader.record(&v.doc).map_err(bundle_store_err(peer))?;
        let (ty, origin) = match (&record, headers.get(&v.doc)) {
            (Some(r), _) => (r.ty.clone(), r.origin),
            (None, Some(h))
                if DocId::names(&h.doc, &h.origin, &replica.node_id(), &h.ty, &h.id) =>
            {
                (h.ty.clone(), h.origin)
            }
            _ => {
                report.rejected += 1;
                continue;
            }
        };
        if replica
            .policies()
            .may_take(&peer, &ty, &origin, &v.author, false)
            .is_err()
        {
            report.rejected += 1;
            continue;
        }
        report.new_changes += 1;
        if record.is_some() {
            updated.insert(v.doc);
        } else {
            added.insert(v.doc);
        }
    }
    report.added = added.len() as u64;
    report.updated = updated.len() as u64;
    Ok(report.new_changes)
}
