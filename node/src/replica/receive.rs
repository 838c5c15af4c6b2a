//! Receiving a batch from a peer, in three stages: verify every signature (on every core, or
//! ahead of the actor on one thread, see [`Checked`]), prepare each document with the engine
//! (on every core, see [`super::apply`]), then commit the results and the new checkpoint in
//! one transaction.

use std::collections::{HashMap, HashSet};

use tidesync_proto::{
    AuthorKey, DocHeader, DocId, Message, NodeId, ObjectId, SignedChange, TypeName, VerifiedChange,
    VerifyError, check_batch,
};

use super::Replica;
use super::SyncError;
use super::apply::{Prepared, Work, prepare, write};
use super::par::{or_unwind, par_chunks, par_map};
use crate::model::Claim;

/// What storing one received batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    pub applied: u64,
    pub held: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub last_seq: u64,
    /// Changes that would have been held but found no room (see [`super::apply::MAX_HELD_CHANGES_PER_PEER`]).
    pub refused_for_room: u64,
}

/// Verify a batch on every core: each core checks its share of the signatures in one batch
/// equation (see [`check_batch`]), with each author's key decompressed once.
pub(crate) fn verify_batch(
    changes: &[SignedChange],
    faults: &crate::fault::Faults,
) -> Vec<Result<VerifiedChange, VerifyError>> {
    verify(changes, faults, true)
}

/// Verify a batch, on every core when `spread` is true, else on this thread.
#[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
fn verify(
    changes: &[SignedChange],
    faults: &crate::fault::Faults,
    spread: bool,
) -> Vec<Result<VerifiedChange, VerifyError>> {
    let decoded: Vec<_> = if spread {
        or_unwind(par_map(changes.iter().collect(), SignedChange::decode))
    } else {
        changes.iter().map(SignedChange::decode).collect()
    };
    #[cfg(feature = "fault-injection")]
    if faults.accept_unsigned {
        return decoded
            .into_iter()
            .map(|d| d.and_then(|d| d.unchecked_for_fault_injection()))
            .collect();
    }
    let mut keys: HashMap<NodeId, Option<AuthorKey>> = HashMap::new();
    for d in decoded.iter().flatten() {
        keys.entry(d.author)
            .or_insert_with(|| AuthorKey::new(&d.author));
    }
    let keys = &keys;
    if spread {
        or_unwind(par_chunks(decoded, |part| check_batch(part, keys)))
    } else {
        check_batch(decoded, keys)
    }
}

/// Batches with fewer changes than this are verified where they are applied: checking a
/// handful of signatures costs less than handing the batch to another thread and back.
pub const MIN_CHECKED_AHEAD_CHANGES: usize = 16;

/// A batch's signatures, verified before the batch reaches the replica: the daemon checks
/// batch N+1 while the actor applies and commits batch N (the pipelined receive path).
///
/// The results travel with the message they were computed from and are taken only for that
/// very list of changes (the same allocation and length, which moving the message keeps);
/// handed any other list, they are dropped and that list is verified again.
#[derive(Debug)]
pub struct Checked {
    of: (usize, usize),
    verified: Vec<Result<VerifiedChange, VerifyError>>,
}

impl Checked {
    /// Verify the changes of `msg` if it is a batch ([`Message::Changes`] or
    /// [`Message::Ahead`]) of at least [`MIN_CHECKED_AHEAD_CHANGES`]; pure CPU work, on this
    /// thread (the actor spreads its own work over every core meanwhile).
    pub fn of_message(msg: &Message, faults: &crate::fault::Faults) -> Option<Checked> {
        let changes = Self::changes_worth_checking(msg)?;
        Some(Checked {
            of: (changes.as_ptr() as usize, changes.len()),
            verified: verify(changes, faults, false),
        })
    }

    /// Whether [`Checked::of_message`] would verify anything of `msg`.
    pub fn wanted(msg: &Message) -> bool {
        Self::changes_worth_checking(msg).is_some()
    }

    fn changes_worth_checking(msg: &Message) -> Option<&[SignedChange]> {
        match msg {
            Message::Changes { changes, .. } | Message::Ahead { changes, .. }
                if changes.len() >= MIN_CHECKED_AHEAD_CHANGES =>
            {
                Some(changes)
            }
            _ => None,
        }
    }

    /// The results, if they were computed from `changes`.
    fn take_for(
        self,
        changes: &[SignedChange],
    ) -> Option<Vec<Result<VerifiedChange, VerifyError>>> {
        (self.of == (changes.as_ptr() as usize, changes.len())).then_some(self.verified)
    }
}

impl Replica {
    /// Verify, apply and durably store a batch from `peer`.
    ///
    /// Verification runs first, on every core, unless `checked` holds this batch's results
    /// already. Then, on every core, each document of the
    /// batch is read from one read transaction and handed, with our policy for the peer, to
    /// the engine. Last, one redb transaction stores the results in the batch's order; the
    /// checkpoint moves in it, after everything it covers.
    pub fn receive_changes(
        &mut self,
        peer: NodeId,
        claim: Option<Claim>,
        headers: Vec<DocHeader>,
        changes: Vec<SignedChange>,
        checked: Option<Checked>,
    ) -> Result<ReceiveReport, SyncError> {
        let now = (self.clock)();
        let me = self.node_id();
        let started = std::time::Instant::now();
        let mut report = ReceiveReport::default();
        let mut headers: HashMap<DocId, DocHeader> = headers
            .into_iter()
            .filter(|h| {
                let ok = DocId::names(&h.doc, &h.origin, &me, &h.ty, &h.id);
                if !ok {
                    tracing::warn!(%peer, doc = %h.doc, "document header does not match its id; ignoring it");
                }
                ok
            })
            .map(|h| (h.doc, h))
            .collect();
        let verified = match checked.and_then(|c| c.take_for(&changes)) {
            Some(verified) => verified,
            None => verify_batch(&changes, &self.faults),
        };
        let verified_at = started.elapsed();
        // Group the batch by document, in order of first appearance, dropping duplicates
        // within the batch (the workers drop those already stored).
        let mut order: Vec<DocId> = Vec::new();
        let mut groups: HashMap<DocId, Vec<(SignedChange, VerifiedChange)>> = HashMap::new();
        let mut seen = HashSet::new();
        for (signed, result) in changes.into_iter().zip(verified) {
            match result {
                Err(e) => {
                    report.rejected += 1;
                    if crate::ratelog::REFUSALS.allow(&peer) {
                        tracing::warn!(%peer, error = %e, "rejected a change");
                    }
                }
                Ok(v) => {
                    if !seen.insert((v.doc, v.hash)) {
                        report.duplicates += 1;
                        continue;
                    }
                    if !groups.contains_key(&v.doc) {
                        order.push(v.doc);
                    }
                    groups.entry(v.doc).or_default().push((signed, v));
                }
            }
        }
        let work: Vec<Work> = order
            .into_iter()
            .map(|doc| Work {
                header: headers.remove(&doc),
                cached: self.cache.pop(&doc),
                incoming: groups.remove(&doc).unwrap_or_default(),
                doc,
            })
            .collect();
        // Documents whose type we do not take from this peer wait until the others are
        // applied: they are taken if one of those references them (`refs`).
        let policy = self.policies.of(&peer);
        let mut by_ref = if policy.refs.is_empty() {
            HashSet::new()
        } else {
            self.store.by_ref(&peer).map_err(super::store_err(peer))?
        };
        if !policy.refs.is_empty() {
            // A carried object may come in a later batch than the object referencing it.
            by_ref.extend(crate::replica::carry::named_by_earlier(
                &self.store,
                &self.policies,
                peer,
                work.iter().map(|w| (w.doc, w.header.as_ref())),
            )?);
        }
        let (deferred, work): (Vec<Work>, Vec<Work>) = work.into_iter().partition(|w| {
            !policy.refs.is_empty()
                && w.header
                    .as_ref()
                    .is_some_and(|h| !policy.covers(&h.ty) && !by_ref.contains(&w.doc))
        });
        // Only the last documents fit in the cache; the workers drop the others' state.
        let cache_from = work.len().saturating_sub(self.cache.cap().get());
        let reader = self.store.reader().map_err(super::store_err(peer))?;
        let engine = &self.engine;
        let policies = &self.policies;
        let mut prepared = or_unwind(par_map(work.into_iter().enumerate().collect(), |(i, w)| {
            prepare(
                engine,
                policies,
                policy,
                peer,
                &reader,
                &by_ref,
                w,
                i >= cache_from,
            )
        }));
        // Take deferred documents referenced by what was taken, round by round (a LabelTree a
        // Volume references may reference Users); what is left over is refused below.
        let mut deferred = deferred;
        let mut newly = 0..prepared.len();
        while !deferred.is_empty() {
            let referenced: HashSet<(TypeName, ObjectId)> = prepared[newly.clone()]
                .iter()
                .flat_map(|p| match p {
                    Ok(Prepared::Arrived(_, _, refs, _)) => refs.clone(),
                    _ => Vec::new(),
                })
                .collect();
            let (taken, rest): (Vec<Work>, Vec<Work>) = deferred.into_iter().partition(|w| {
                w.header.as_ref().is_some_and(|h| {
                    let local = policies.local_name(&h.origin, &h.ty, &h.id);
                    referenced.contains(&(h.ty.clone(), h.id.clone()))
                        || local.is_ok_and(|l| referenced.contains(&(h.ty.clone(), l)))
                })
            });
            deferred = rest;
            if taken.is_empty() {
                break;
            }
            by_ref.extend(taken.iter().map(|w| w.doc));
            newly = prepared.len()..prepared.len() + taken.len();
            for w in taken {
                prepared.push(prepare(
                    engine, policies, policy, peer, &reader, &by_ref, w, true,
                ));
            }
        }
        for w in deferred {
            prepared.push(prepare(
                engine, policies, policy, peer, &reader, &by_ref, w, false,
            ));
        }
        let tally = reader.held_tally(&peer).map_err(super::store_err(peer))?;
        drop(reader);
        crate::replica::carry::remember_references(
            &self.store,
            peer,
            prepared.iter().flat_map(|p| match p {
                Ok(Prepared::Arrived(_, _, refs, _)) => refs.as_slice(),
                _ => &[],
            }),
        )?;
        let applied_at = started.elapsed();
        let written = write(
            &self.store,
            peer,
            claim,
            now,
            (report.rejected, report.duplicates),
            prepared,
            tally,
            &self.faults,
            &|doc| super::files::wants_of(&self.policies, me, peer, doc, now),
        )
        .map_err(super::store_err(peer))?;
        for (want, wanted) in written.wanted {
            match wanted {
                crate::store::Wanted::Added | crate::store::Wanted::Merged => {
                    self.new_wants.push(want)
                }
                crate::store::Wanted::OverQuota => {
                    if crate::ratelog::REFUSALS.allow(&peer) {
                        tracing::warn!(%peer, file = %want.hash, size = want.size, "the peer's quota of wanted files is full; this file is not fetched");
                    }
                }
                crate::store::Wanted::Held => {}
            }
        }
        report.refused_for_room = written.refused_for_room;
        report.applied = written.applied;
        report.held = written.held;
        report.rejected += written.rejected;
        report.duplicates += written.duplicates;
        report.last_seq = written.last_seq;
        if report.applied > 0 {
            self.new_tip = Some(written.last_seq);
        }
        if let (Some(c), false) = (&claim, written.moved) {
            tracing::debug!(%peer, after = c.after, upto = c.upto.seq, "batch arrived ahead of a gap; the checkpoint moves once the gap is filled");
        }
        for (doc_id, doc) in written.docs {
            self.cache.put(doc_id, doc);
        }
        if written.own_refused {
            tracing::warn!(%peer, "an equivocation refused one of this node's own changes; writing on under a new actor");
            self.engine = self.engine.renewed();
        }
        tracing::debug!(
            %peer,
            applied = report.applied,
            held = report.held,
            rejected = report.rejected,
            duplicates = report.duplicates,
            upto = claim.map(|c| c.upto.seq),
            verify_ms = verified_at.as_secs_f64() * 1e3,
            apply_ms = (applied_at - verified_at).as_secs_f64() * 1e3,
            commit_ms = (started.elapsed() - applied_at).as_secs_f64() * 1e3,
            "stored a batch"
        );
        if self.timings.len() >= super::MAX_BATCH_TIMINGS {
            self.timings.remove(0);
        }
        self.timings.push(crate::model::BatchTiming {
            verify: verified_at,
            apply: applied_at - verified_at,
            commit: started.elapsed() - applied_at,
        });
        Ok(report)
    }
}
