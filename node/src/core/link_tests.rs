//! Shaped links between in-memory cores on a clock the test turns: the day's budget is strict
//! for batches, every frame is counted, a record that does not fit waits for the next day,
//! and one larger than the whole budget waits for `sync --now`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde_json::json;
use tidesync_proto::wire::frame_bytes;
use tidesync_proto::{Message, ObjectId, TypeName};

use super::sync_tests::{Sent, connect};
use super::*;
use crate::identity::Identity;
use crate::link::{DAY_MS, HeldBack, Link};
use crate::policy::Policy;

/// Bytes a day the tests' link may carry.
const BUDGET: u64 = 4_000;

fn core_at(secret: u8, name: &str, clock: &Arc<AtomicI64>) -> Core {
    let c = Arc::clone(clock);
    Core::with_clock(
        name.into(),
        Identity::from_secret([secret; 32]),
        Store::in_memory().unwrap(),
        64,
        true,
        u64::from(secret),
        Arc::new(move || c.load(Ordering::SeqCst)),
    )
}

fn put_sample(c: &mut Core, id: &str, blob_bytes: usize) {
    let (t, i) = (TypeName::new("Sample").unwrap(), ObjectId::new(id).unwrap());
    let v = json!({"blob": "x".repeat(blob_bytes)});
    c.put(&t, &i, v.as_object().unwrap()).unwrap();
}

fn samples(c: &Core) -> usize {
    let t = TypeName::new("Sample").unwrap();
    c.list(&t, None, 1_000).unwrap().ids.len()
}

/// Deliver everything queued, as `sync_tests::settle` does, and return the frame bytes core
/// 0 sent core 1 (its requests and its responses).
fn settle_counting(cores: &mut [Core], mut queue: VecDeque<(usize, Outgoing)>) -> u64 {
    let mut sent_by_0 = 0;
    while let Some((from, (to_node, msg))) = queue.pop_front() {
        let to = usize::from(from == 0);
        let from_node = cores[from].node_id();
        if from == 0 {
            sent_by_0 += frame_bytes(&msg) as u64;
        }
        let (resp, outs) = cores[to].sent_on_request(from_node, msg).unwrap();
        if to == 0 {
            sent_by_0 += frame_bytes(&resp) as u64;
        }
        queue.extend(outs.into_iter().map(|o| (to, o)));
        let outs = cores[from].sent_on_response(to_node, resp).unwrap();
        queue.extend(outs.into_iter().map(|o| (from, o)));
    }
    sent_by_0
}

fn shaped_pair(clock: &Arc<AtomicI64>) -> Vec<Core> {
    let mut cores = vec![core_at(1, "hub", clock), core_at(2, "ship", clock)];
    let ship = cores[1].node_id();
    let link = Link {
        budget: Some(BUDGET),
        ..Link::default()
    };
    let policy = Policy {
        link,
        ..Policy::default()
    };
    cores[0].set_policy(ship, "ship".into(), policy).unwrap();
    cores
}

#[test]
fn a_days_budget_holds_every_batch_and_counts_every_frame() {
    let clock = Arc::new(AtomicI64::new(20_000 * DAY_MS + 10 * 3_600_000));
    let mut cores = shaped_pair(&clock);
    let ship = cores[1].node_id();
    // Twenty records of about 600 bytes: three times the day's budget.
    for i in 0..20 {
        put_sample(&mut cores[0], &format!("S-{i}"), 600);
    }
    let q = connect(&mut cores, 0, 1);
    let sent = settle_counting(&mut cores, q);
    let now = clock.load(Ordering::SeqCst);
    let counted = cores[0]
        .store()
        .meter(&ship)
        .unwrap()
        .on_day(now.div_euclid(crate::link::DAY_MS))
        .bytes;
    // Every frame, Hello and Acks included, is counted, and none passes the budget.
    assert_eq!(counted, sent);
    assert!(
        sent <= BUDGET,
        "{sent} bytes sent under a budget of {BUDGET}"
    );
    let got = samples(&cores[1]);
    assert!(got > 0 && got < 20, "the ship got {got} of 20 today");
    let held = cores[0].session(&ship).unwrap().held_back;
    assert!(
        matches!(held, Some(HeldBack::BudgetShort { .. })),
        "{held:?}"
    );
    // A day later the tick sends the next day's share.
    clock.fetch_add(DAY_MS, Ordering::SeqCst);
    let q: VecDeque<_> = {
        cores[0].pump_shaped().unwrap();
        cores[0]
            .take_outbox()
            .sends
            .into_iter()
            .map(|o| (0, o))
            .collect()
    };
    let sent = settle_counting(&mut cores, q);
    assert!(sent <= BUDGET, "{sent}");
    assert!(samples(&cores[1]) > got, "nothing went on the second day");
}

// Regression: a record larger than what was left of the day's budget went anyway ("a day can
// end over budget by at most one record"), so a metered link could pass its budget. Now it
// waits for the next day, and one larger than the whole budget waits for `sync --now`.
#[test]
fn a_record_larger_than_the_budget_waits_for_sync_now() {
    let clock = Arc::new(AtomicI64::new(20_000 * DAY_MS + 10 * 3_600_000));
    let mut cores = shaped_pair(&clock);
    let ship = cores[1].node_id();
    put_sample(&mut cores[0], "S-big", 2 * BUDGET as usize);
    let q = connect(&mut cores, 0, 1);
    let sent = settle_counting(&mut cores, q);
    assert!(sent <= BUDGET, "{sent}");
    assert_eq!(samples(&cores[1]), 0);
    let held = cores[0].session(&ship).unwrap().held_back.unwrap();
    assert!(
        held.to_string()
            .contains("more than the whole daily budget"),
        "{held}"
    );
    // The operator sends it once, on purpose.
    let hub = &mut cores[0];
    let out = hub.sessions.sync_now(&mut hub.replica, ship).unwrap();
    assert!(
        out.iter()
            .any(|(_, m)| matches!(m, Message::Changes { changes, .. } if !changes.is_empty()))
    );
    let q = out.into_iter().map(|o| (0, o)).collect();
    settle_counting(&mut cores, q);
    assert_eq!(samples(&cores[1]), 1);
}

// Regression: `plan` counted record bytes before compression, so a ship's cost preview
// overstated what zstd-compressed batches take on the wire (several times, for lab records).
#[test]
fn the_plan_counts_batches_as_they_cross_compressed() {
    let clock = Arc::new(AtomicI64::new(20_000 * DAY_MS));
    let mut cores = vec![core_at(1, "hub", &clock), core_at(2, "ship", &clock)];
    let ship = cores[1].node_id();
    cores[0]
        .set_policy(ship, "ship".into(), Policy::default())
        .unwrap();
    // Records that compress as lab records do, in more than one batch.
    for i in 0..3_000 {
        put_sample(&mut cores[0], &format!("S-{i:04}"), 600);
    }
    let plan = cores[0].plan("ship", false).unwrap();
    assert_eq!(plan.changes, 3_000);
    assert!(plan.batches > 1, "{plan:?}");
    assert!(
        plan.bytes * 3 < plan.plain_bytes,
        "compressed {} of {} bytes",
        plan.bytes,
        plan.plain_bytes
    );
    // What the hub then sends in its batches of changes, frame by frame.
    let mut queue = connect(&mut cores, 0, 1);
    let mut sent = 0u64;
    while let Some((from, (to_node, msg))) = queue.pop_front() {
        let to = usize::from(from == 0);
        if matches!(&msg, Message::Changes { changes, .. } if !changes.is_empty()) {
            sent += frame_bytes(&msg) as u64;
        }
        let from_node = cores[from].node_id();
        let (resp, outs) = cores[to].sent_on_request(from_node, msg).unwrap();
        queue.extend(outs.into_iter().map(|o| (to, o)));
        let outs = cores[from].sent_on_response(to_node, resp).unwrap();
        queue.extend(outs.into_iter().map(|o| (from, o)));
    }
    assert_eq!(cores[1].store().counts().unwrap()["Sample"].live, 3_000);
    let off = plan.bytes.abs_diff(sent) as f64 / sent as f64;
    assert!(off < 0.02, "planned {} bytes, sent {sent}", plan.bytes);
}
