//! The session protocol between in-memory cores: convergence, loss, relays, restarts.

use super::*;
use crate::replica::outbound::SYNC_BATCH_CHANGES;
use crate::sync::*;
use serde_json::{Value as Json, json};
use std::collections::VecDeque;
use tidesync_proto::Checkpoint;
use tidesync_proto::{Message, NodeId};
use tidesync_proto::{ObjectId, TypeName};

/// Each step of a core with what it left to send, as these tests deliver it.
pub(crate) trait Sent {
    fn sent_on_connected(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError>;
    fn sent_on_request(
        &mut self,
        peer: NodeId,
        msg: Message,
    ) -> Result<(Message, Vec<Outgoing>), SyncError>;
    fn sent_on_response(&mut self, peer: NodeId, msg: Message) -> Result<Vec<Outgoing>, SyncError>;
    fn sent_on_request_failed(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError>;
    fn sent_pump_all(&mut self) -> Result<Vec<Outgoing>, SyncError>;
    fn sent_pump(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError>;
}

impl Sent for Core {
    fn sent_on_connected(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError> {
        self.on_connected(peer)?;
        Ok(self.take_outbox().sends)
    }
    fn sent_on_request(
        &mut self,
        peer: NodeId,
        msg: Message,
    ) -> Result<(Message, Vec<Outgoing>), SyncError> {
        // As the daemon hands a batch over: its signatures verified ahead (see `Checked`).
        let checked = Checked::of_message(&msg, self.replica().faults());
        let answer = self.on_request(peer, msg, checked)?;
        Ok((answer, self.take_outbox().sends))
    }
    fn sent_on_response(&mut self, peer: NodeId, msg: Message) -> Result<Vec<Outgoing>, SyncError> {
        self.on_response(peer, msg)?;
        Ok(self.take_outbox().sends)
    }
    fn sent_on_request_failed(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError> {
        self.on_request_failed(peer)?;
        Ok(self.take_outbox().sends)
    }
    fn sent_pump_all(&mut self) -> Result<Vec<Outgoing>, SyncError> {
        self.pump_all()?;
        Ok(self.take_outbox().sends)
    }
    fn sent_pump(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError> {
        let mut out = self.take_outbox().sends;
        out.extend(self.sessions.pump(&mut self.replica, peer)?);
        Ok(out)
    }
}

fn core(secret: u8, name: &str) -> Core {
    Core::in_memory(secret, name)
}

fn put(c: &mut Core, id: &str, v: Json) {
    let (t, i) = (TypeName::new("Sample").unwrap(), ObjectId::new(id).unwrap());
    c.put(&t, &i, v.as_object().unwrap()).unwrap();
}

fn get(c: &mut Core, id: &str) -> Option<Json> {
    let (t, i) = (TypeName::new("Sample").unwrap(), ObjectId::new(id).unwrap());
    c.get(&t, &i).ok().map(Json::Object)
}

/// Deliver every request and response until nothing is left; links are (a, b) index pairs.
fn settle(cores: &mut [Core], mut queue: VecDeque<(usize, Outgoing)>) -> usize {
    let mut delivered = 0;
    while let Some((from, (to_node, msg))) = queue.pop_front() {
        let to = cores.iter().position(|c| c.node_id() == to_node).unwrap();
        if cores[to].session(&cores[from].node_id()).is_none() {
            continue;
        }
        delivered += 1;
        queue.extend(deliver_one(cores, (from, (to_node, msg))));
    }
    delivered
}

/// Connect cores `a` and `b`: the Hellos each sends, to deliver.
pub(crate) fn connect(cores: &mut [Core], a: usize, b: usize) -> VecDeque<(usize, Outgoing)> {
    let (na, nb) = (cores[a].node_id(), cores[b].node_id());
    let mut q = VecDeque::new();
    q.extend(
        cores[a]
            .sent_on_connected(nb)
            .unwrap()
            .into_iter()
            .map(|o| (a, o)),
    );
    q.extend(
        cores[b]
            .sent_on_connected(na)
            .unwrap()
            .into_iter()
            .map(|o| (b, o)),
    );
    q
}

/// What core `i` sends after a local write, to deliver.
pub(crate) fn push(cores: &mut [Core], i: usize) -> VecDeque<(usize, Outgoing)> {
    cores[i]
        .sent_pump_all()
        .unwrap()
        .into_iter()
        .map(|o| (i, o))
        .collect()
}

#[test]
fn two_nodes_converge_both_ways_with_concurrent_edits() {
    let mut cores = vec![core(1, "a"), core(2, "b")];
    put(&mut cores[0], "S-A", json!({"from": "a"}));
    put(&mut cores[1], "S-B", json!({"from": "b"}));
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    assert_eq!(get(&mut cores[1], "S-A"), Some(json!({"from": "a"})));
    assert_eq!(get(&mut cores[0], "S-B"), Some(json!({"from": "b"})));
    // Concurrent edits of one object on both sides, pushed at the same time.
    put(&mut cores[0], "S-A", json!({"x": 1, "same": "a"}));
    put(&mut cores[1], "S-A", json!({"y": 2, "same": "b"}));
    let mut q = push(&mut cores, 0);
    q.extend(push(&mut cores, 1));
    settle(&mut cores, q);
    let a = get(&mut cores[0], "S-A").unwrap();
    assert_eq!(Some(a.clone()), get(&mut cores[1], "S-A"));
    assert_eq!((a["x"].clone(), a["y"].clone()), (json!(1), json!(2)));
    // Nothing is echoed back: each side stored each change once.
    let rec = cores[0].store().peer(&cores[1].node_id()).unwrap();
    assert_eq!(rec.duplicates, 0);
}

/// What core `i` wants sent, queued for `settle`.
fn from(i: usize, out: Result<Vec<Outgoing>, SyncError>) -> VecDeque<(usize, Outgoing)> {
    out.unwrap().into_iter().map(|o| (i, o)).collect()
}

/// Deliver one request from `from`'s queue entry and its response; returns what both
/// sides want sent next.
fn deliver_one(
    cores: &mut [Core],
    (from, (to_node, msg)): (usize, Outgoing),
) -> VecDeque<(usize, Outgoing)> {
    let to = cores.iter().position(|c| c.node_id() == to_node).unwrap();
    let from_node = cores[from].node_id();
    let (resp, outs) = cores[to].sent_on_request(from_node, msg).unwrap();
    let mut q: VecDeque<_> = outs.into_iter().map(|o| (to, o)).collect();
    let outs = cores[from].sent_on_response(to_node, resp).unwrap();
    q.extend(outs.into_iter().map(|o| (from, o)));
    q
}

// Regression (found by the simulation, seed 1): batches travel on separate streams, so the
// Ack of a later batch can come first. It used to count as acknowledging every earlier
// batch too, so when an earlier batch was lost and its request failed, sending resumed
// after the later one and the lost batch's changes never reached the peer while the
// connection stayed up.
#[test]
fn a_lost_batch_is_resent_even_when_a_later_batch_was_acknowledged() {
    let mut cores = vec![core(1, "a"), core(2, "b")];
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    put(&mut cores[0], "S-1", json!({"v": 1}));
    let first = push(&mut cores, 0);
    put(&mut cores[0], "S-2", json!({"v": 2}));
    let second = push(&mut cores, 0);
    assert_eq!((first.len(), second.len()), (1, 1), "two batches in flight");
    // The first batch is lost; the second arrives and is acknowledged.
    let q = deliver_one(&mut cores, second.into_iter().next().unwrap());
    settle(&mut cores, q);
    // The first one's request fails: what it carried is sent again.
    let b = cores[1].node_id();
    let q = from(0, cores[0].sent_on_request_failed(b));
    settle(&mut cores, q);
    assert_eq!(get(&mut cores[1], "S-1"), Some(json!({"v": 1})));
    assert_eq!(get(&mut cores[1], "S-2"), Some(json!({"v": 2})));
}

// Regression (found by the simulation, seed 8): a Hello whose request failed was never
// sent again, so the peer never started streaming its log to us on that connection.
#[test]
fn a_lost_hello_is_sent_again() {
    let mut cores = vec![core(1, "a"), core(2, "b")];
    put(&mut cores[1], "S-B", json!({"from": "b"}));
    let (a, b) = (cores[0].node_id(), cores[1].node_id());
    let lost = cores[0].sent_on_connected(b).unwrap();
    assert!(matches!(lost[0].1, Message::Hello { .. }));
    let q = from(1, cores[1].sent_on_connected(a));
    settle(&mut cores, q);
    assert_eq!(get(&mut cores[0], "S-B"), None, "b waits for a's Hello");
    let q = from(0, cores[0].sent_on_request_failed(b));
    settle(&mut cores, q);
    assert_eq!(get(&mut cores[0], "S-B"), Some(json!({"from": "b"})));
}

#[test]
fn a_hub_relays_unaltered_and_a_tampering_hub_is_caught() {
    for tamper in [false, true] {
        let mut cores = vec![core(1, "a"), core(2, "hub"), core(3, "b")];
        cores[1].replica.faults_mut().alter_relayed = tamper;
        let mut q = connect(&mut cores, 0, 1);
        q.extend(connect(&mut cores, 1, 2));
        settle(&mut cores, q);
        put(&mut cores[0], "S-1", json!({"v": 1}));
        let q = push(&mut cores, 0);
        settle(&mut cores, q);
        assert_eq!(get(&mut cores[1], "S-1"), Some(json!({"v": 1})));
        let b = cores[2].store().peer(&cores[1].node_id()).unwrap();
        if tamper {
            assert_eq!(get(&mut cores[2], "S-1"), None);
            assert_eq!(b.rejected, 1);
            assert_eq!(cores[2].store().last_seq().unwrap(), 0);
        } else {
            assert_eq!(get(&mut cores[2], "S-1"), Some(json!({"v": 1})));
            let (t, i) = (
                TypeName::new("Sample").unwrap(),
                ObjectId::new("S-1").unwrap(),
            );
            let h = cores[2].history(&t, &i).unwrap();
            assert!(h.changes.iter().all(|c| c.verified));
            assert_eq!(h.changes[0].author, cores[0].node_id().to_string());
        }
    }
}

#[test]
fn after_a_disconnection_only_the_difference_crosses() {
    let mut cores = vec![core(1, "a"), core(2, "b")];
    for i in 0..50 {
        put(&mut cores[0], &format!("S-{i}"), json!({"i": i}));
    }
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    let b_id = cores[1].node_id();
    let a_id = cores[0].node_id();
    assert_eq!(cores[1].store().peer(&a_id).unwrap().changes_in, 50);
    cores[0].on_disconnected(&b_id);
    cores[1].on_disconnected(&a_id);
    for i in 0..3 {
        put(
            &mut cores[0],
            &format!("S-{i}"),
            json!({"i": i, "again": true}),
        );
    }
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    let rec = cores[1].store().peer(&a_id).unwrap();
    assert_eq!(rec.changes_in, 53);
    assert_eq!(rec.duplicates, 0);
    assert_eq!(
        get(&mut cores[1], "S-2"),
        Some(json!({"i": 2, "again": true}))
    );
    // Idle: nothing differs, nothing but the two Hellos crosses.
    cores[0].on_disconnected(&b_id);
    cores[1].on_disconnected(&a_id);
    let q = connect(&mut cores, 0, 1);
    let in_sync = |c: &Core, p: &NodeId| c.session(p).and_then(|s| s.in_sync_after_ms);
    assert_eq!(in_sync(&cores[0], &b_id), None, "in sync before any Hello");
    assert_eq!(settle(&mut cores, q), 2);
    assert!(in_sync(&cores[0], &b_id).is_some());
    assert!(in_sync(&cores[1], &a_id).is_some());
}

#[test]
fn large_logs_stream_in_bounded_batches() {
    let mut cores = vec![core(1, "a"), core(2, "b")];
    for i in 0..(SYNC_BATCH_CHANGES + 10) {
        put(&mut cores[0], &format!("S-{i}"), json!({"i": i}));
    }
    let mut q = connect(&mut cores, 0, 1);
    let mut max_batch = 0;
    // Watch every batch go by.
    while let Some((from, out)) = q.pop_front() {
        if let Message::Changes { changes, .. } = &out.1 {
            max_batch = max_batch.max(changes.len());
        }
        let to = if from == 0 { 1 } else { 0 };
        let (from_id, to_id) = (cores[from].node_id(), cores[to].node_id());
        let (resp, outs) = cores[to].sent_on_request(from_id, out.1).unwrap();
        q.extend(outs.into_iter().map(|o| (to, o)));
        q.extend(
            cores[from]
                .sent_on_response(to_id, resp)
                .unwrap()
                .into_iter()
                .map(|o| (from, o)),
        );
    }
    assert_eq!(max_batch, SYNC_BATCH_CHANGES);
    assert_eq!(
        cores[1].store().last_seq().unwrap() as usize,
        SYNC_BATCH_CHANGES + 10
    );
    // Every batch moved B's checkpoint of A, up to A's last SEQ.
    let a = cores[0].node_id();
    assert_eq!(
        cores[1].store().peer(&a).unwrap().received.seq as usize,
        SYNC_BATCH_CHANGES + 10
    );
}

// Regression: every Hello with a checkpoint we never had, every Rewound and every Hello
// from the start restarted the stream from the start and read a fresh window of batches at
// once, so a peer repeating them made us rescan and resend the start of the log over and
// over. Now a rewound answer and a resend happen once per session, and a restart waits for
// the batches in flight.
#[test]
fn repeated_hellos_and_rewounds_do_not_rescan_the_log_again_and_again() {
    let mut cores = vec![core(1, "a"), core(2, "b")];
    for i in 0..5 {
        put(&mut cores[0], &format!("S-{i}"), json!({"i": i}));
    }
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    let b = cores[1].node_id();
    let count = |out: &[Outgoing]| {
        let changes = out
            .iter()
            .filter(|(_, m)| matches!(m, Message::Changes { .. }))
            .count();
        let rewound = out
            .iter()
            .filter(|(_, m)| matches!(m, Message::Rewound { .. }))
            .count();
        (changes, rewound)
    };
    let hello = |number: u64, resume: Checkpoint| Message::Hello {
        number,
        node: b,
        name: "b".into(),
        resume,
        tip: 0,
    };
    let bogus = Checkpoint {
        seq: 999,
        hash: [9; 32],
    };
    let mut out = Vec::new();
    for n in 0..50 {
        out.extend(
            cores[0]
                .sent_on_request(b, hello(100 + n, bogus))
                .unwrap()
                .1,
        );
    }
    assert_eq!(count(&out), (1, 1), "one restart and one Rewound");
    let mut out = Vec::new();
    for _ in 0..50 {
        let rewound = Message::Rewound {
            resume: Checkpoint::default(),
        };
        out.extend(cores[0].sent_on_request(b, rewound).unwrap().1);
    }
    assert_eq!(count(&out), (0, 0), "the batch in flight is not read again");
    let mut out = Vec::new();
    for n in 0..50 {
        let from_start = hello(200 + n, Checkpoint::default());
        out.extend(cores[0].sent_on_request(b, from_start).unwrap().1);
    }
    assert_eq!(count(&out), (0, 0), "restarts wait for the batch in flight");
}

// The restart a peer asks for while batches are in flight still happens once they are
// answered, so a peer whose policy widened gets the whole log.
#[test]
fn a_restart_asked_for_during_a_window_follows_it() {
    let mut cores = vec![core(1, "a"), core(2, "b")];
    put(&mut cores[0], "S-1", json!({"v": 1}));
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    let (a, b) = (cores[0].node_id(), cores[1].node_id());
    put(&mut cores[0], "S-2", json!({"v": 2}));
    let sent = cores[0].sent_pump(b).unwrap();
    assert!(matches!(sent[..], [(_, Message::Changes { .. })]));
    // b asks for everything again while that batch is in flight: nothing more yet.
    let hello = Message::Hello {
        number: 99,
        node: b,
        name: "b".into(),
        resume: Checkpoint::default(),
        tip: 0,
    };
    let (_, out) = cores[0].sent_on_request(b, hello).unwrap();
    assert!(out.is_empty(), "{out:?}");
    // Once the batch is answered, sending starts over from the start of the log.
    let (ack, _) = cores[1].sent_on_request(a, sent[0].1.clone()).unwrap();
    let out = cores[0].sent_on_response(b, ack).unwrap();
    assert!(
        matches!(out[..], [(_, Message::Changes { after: 0, .. })]),
        "{out:?}"
    );
}

#[test]
fn a_sender_restored_from_an_older_copy_starts_over() {
    let mut cores = vec![core(1, "a"), core(2, "b")];
    put(&mut cores[0], "S-1", json!({"v": 1}));
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    let (a_id, b_id) = (cores[0].node_id(), cores[1].node_id());
    cores[0].on_disconnected(&b_id);
    cores[1].on_disconnected(&a_id);
    // "Restore" a from before its write: a fresh store with the same key, and a new write.
    cores[0] = core(1, "a");
    put(&mut cores[0], "S-2", json!({"v": 2}));
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    assert_eq!(get(&mut cores[1], "S-2"), Some(json!({"v": 2})));
    // And a gets back what it lost, from b.
    assert_eq!(get(&mut cores[0], "S-1"), Some(json!({"v": 1})));
}

/// Cores `a` (holding 40 objects) and `b`, connected, and the first batch `a` sends `b`,
/// not yet delivered.
pub(crate) fn a_first_batch() -> (Vec<Core>, Message) {
    let mut cores = vec![core(1, "a"), core(2, "b")];
    for i in 0..40 {
        put(&mut cores[0], &format!("S-{i}"), json!({"i": i}));
    }
    let mut q = connect(&mut cores, 0, 1);
    while let Some((from, out)) = q.pop_front() {
        if from == 0 && matches!(out.1, Message::Changes { .. }) {
            return (cores, out.1);
        }
        q.extend(deliver_one(&mut cores, (from, out)));
    }
    panic!("a sent no batch");
}

/// The batch with one signature altered.
fn forged(batch: &Message) -> Message {
    let mut forged = batch.clone();
    let Message::Changes { changes, .. } = &mut forged else {
        unreachable!()
    };
    changes[4].signature[0] ^= 1;
    forged
}

fn rejected(ack: Message) -> u32 {
    let Message::Ack { rejected, .. } = ack else {
        panic!("not an Ack: {ack:?}")
    };
    rejected
}

#[test]
fn a_batch_verified_ahead_is_stored_and_its_forged_change_refused() {
    let (mut cores, batch) = a_first_batch();
    let Message::Changes { changes, .. } = &batch else {
        unreachable!()
    };
    assert!(changes.len() >= crate::replica::receive::MIN_CHECKED_AHEAD_CHANGES);
    let (a, faults) = (cores[0].node_id(), *cores[1].replica().faults());
    let forged = forged(&batch);
    let checked = Checked::of_message(&forged, &faults);
    assert!(checked.is_some());
    assert_eq!(
        rejected(cores[1].on_request(a, forged, checked).unwrap()),
        1
    );
    assert_eq!(cores[1].store().last_seq().unwrap(), 39);
    let (mut cores, batch) = a_first_batch();
    let checked = Checked::of_message(&batch, &faults);
    assert_eq!(rejected(cores[1].on_request(a, batch, checked).unwrap()), 0);
    assert_eq!(cores[1].store().last_seq().unwrap(), 40);
    assert_eq!(get(&mut cores[1], "S-7"), Some(json!({"i": 7})));
}

/// A batch's signatures verified ahead are taken only for the very batch they were computed
/// from: handed along with another batch (here the same changes with one signature forged),
/// they would let the forged change in unverified.
#[test]
fn signatures_verified_for_one_batch_are_not_taken_for_another() {
    let (mut cores, batch) = a_first_batch();
    let (a, faults) = (cores[0].node_id(), *cores[1].replica().faults());
    let genuine = Checked::of_message(&batch, &faults);
    assert_eq!(
        rejected(cores[1].on_request(a, forged(&batch), genuine).unwrap()),
        1
    );
    assert_eq!(cores[1].store().last_seq().unwrap(), 39);
}
