//! Priority types cross ahead of log order (`Message::Ahead`): within a day's budget a ship's
//! samples go before older bulk records, each change crosses once, and what went ahead is
//! still left out of log order after the sender restarts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde_json::json;
use tidesync_proto::{Message, NodeId, ObjectId, TypeName};

use super::sync_tests::{Sent, connect};
use super::*;
use crate::identity::Identity;
use crate::link::{DAY_MS, Link};
use crate::policy::Policy;

/// Bytes a day the link may carry: about a fifth of the annotations.
const BUDGET: u64 = 8_000;
const ANNOTATIONS: usize = 40;
const SAMPLES: usize = 5;

fn core_on(secret: u8, name: &str, store: Store, clock: &Arc<AtomicI64>) -> Core {
    let c = Arc::clone(clock);
    Core::with_clock(
        name.into(),
        Identity::from_secret([secret; 32]),
        store,
        64,
        true,
        u64::from(secret) + 100 * clock.load(Ordering::SeqCst).unsigned_abs(),
        Arc::new(move || c.load(Ordering::SeqCst)),
    )
}

/// Text that compression cannot shrink, so that records cost their size on the link.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            char::from(b'a' + ((x >> 33) % 26) as u8)
        })
        .collect()
}

fn put(c: &mut Core, ty: &str, id: &str, bytes: usize, seed: u64) {
    let (t, i) = (TypeName::new(ty).unwrap(), ObjectId::new(id).unwrap());
    let v = json!({ "data": noise(seed, bytes) });
    c.put(&t, &i, v.as_object().unwrap()).unwrap();
}

fn count(c: &Core, ty: &str) -> usize {
    let t = TypeName::new(ty).unwrap();
    c.list(&t, None, 1_000).unwrap().ids.len()
}

/// Deliver everything queued between cores 0 and 1; the kinds of the batches core 0 sent, in
/// order ("ahead" or "changes", those carrying changes only).
fn settle(cores: &mut [Core], mut queue: VecDeque<(usize, Outgoing)>) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    while let Some((from, (to_node, msg))) = queue.pop_front() {
        let to = usize::from(from == 0);
        if from == 0 {
            match &msg {
                Message::Ahead { changes, .. } if !changes.is_empty() => kinds.push("ahead"),
                Message::Changes { changes, .. } if !changes.is_empty() => kinds.push("changes"),
                _ => {}
            }
        }
        let from_node = cores[from].node_id();
        let (resp, outs) = cores[to].sent_on_request(from_node, msg).unwrap();
        queue.extend(outs.into_iter().map(|o| (to, o)));
        let outs = cores[from].sent_on_response(to_node, resp).unwrap();
        queue.extend(outs.into_iter().map(|o| (from, o)));
    }
    kinds
}

/// The hub's policy for the ship: a daily budget and, if `priority`, samples first.
fn policy(priority: bool) -> Policy {
    Policy {
        link: Link {
            budget: Some(BUDGET),
            ..Link::default()
        },
        priority: if priority {
            vec![TypeName::new("Sample").unwrap()]
        } else {
            Vec::new()
        },
        ..Policy::default()
    }
}

/// The hub writes a month of annotations, then today's samples.
fn write_hub(hub: &mut Core) {
    for i in 0..ANNOTATIONS {
        put(hub, "Annotation", &format!("A-{i}"), 700, i as u64);
    }
    for i in 0..SAMPLES {
        put(hub, "Sample", &format!("S-{i}"), 200, 1_000 + i as u64);
    }
}

/// Turn the clock a day at a time, pumping the shaped link, until the ship has everything.
fn days_until_done(cores: &mut [Core], clock: &Arc<AtomicI64>) -> usize {
    for day in 1..=30 {
        if count(&cores[1], "Annotation") == ANNOTATIONS && count(&cores[1], "Sample") == SAMPLES {
            return day;
        }
        clock.fetch_add(DAY_MS, Ordering::SeqCst);
        cores[0].pump_shaped().unwrap();
        let q: VecDeque<_> = cores[0]
            .take_outbox()
            .sends
            .into_iter()
            .map(|o| (0, o))
            .collect();
        settle(cores, q);
    }
    panic!("the ship did not get everything in 30 days");
}

/// A hub over `hub_store` and a ship, the hub's policy for the ship set (see [`policy`]) and
/// its records written; their ids.
fn pair(hub_store: Store, clock: &Arc<AtomicI64>, priority: bool) -> (Vec<Core>, NodeId, NodeId) {
    let mut cores = vec![
        core_on(1, "hub", hub_store, clock),
        core_on(2, "ship", Store::in_memory().unwrap(), clock),
    ];
    let (hub, ship) = (cores[0].node_id(), cores[1].node_id());
    cores[0]
        .set_policy(ship, "ship".into(), policy(priority))
        .unwrap();
    write_hub(&mut cores[0]);
    (cores, hub, ship)
}

fn ship_record_of(ship: &Core, hub: NodeId) -> crate::model::PeerRecord {
    ship.store().peer(&hub).unwrap()
}

#[test]
fn within_a_days_budget_priority_types_cross_before_older_bulk() {
    let clock = Arc::new(AtomicI64::new(20_000 * DAY_MS + 10 * 3_600_000));
    for priority in [false, true] {
        let (mut cores, hub, ship) = pair(Store::in_memory().unwrap(), &clock, priority);
        let q = connect(&mut cores, 0, 1);
        let kinds = settle(&mut cores, q);
        let (samples, annotations) = (count(&cores[1], "Sample"), count(&cores[1], "Annotation"));
        assert!(annotations < ANNOTATIONS, "the budget binds: {annotations}");
        if priority {
            // Today's samples crossed on the first day, before any older annotation.
            assert_eq!(samples, SAMPLES, "{kinds:?}");
            assert_eq!(kinds.first(), Some(&"ahead"), "{kinds:?}");
        } else {
            // Without priority they wait behind the annotations (the test can fail).
            assert_eq!(samples, 0, "{kinds:?}");
            assert!(!kinds.contains(&"ahead"), "{kinds:?}");
        }
        days_until_done(&mut cores, &clock);
        // Each change crossed once: the ship stored every change and dropped no duplicate.
        let record = ship_record_of(&cores[1], hub);
        assert_eq!(record.duplicates, 0, "{record:?}");
        assert_eq!(
            record.changes_in,
            (ANNOTATIONS + SAMPLES) as u64,
            "{record:?}"
        );
        assert!(
            cores[0].store().sent_ahead(&ship).unwrap().is_empty(),
            "the checkpoint passed what went ahead"
        );
    }
}

#[test]
fn what_went_ahead_stays_left_out_after_the_sender_restarts() {
    let clock = Arc::new(AtomicI64::new(20_000 * DAY_MS + 10 * 3_600_000));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.redb");
    let (mut cores, hub, ship) = pair(Store::create(&path).unwrap(), &clock, true);
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    assert_eq!(count(&cores[1], "Sample"), SAMPLES);
    let ahead = cores[0].store().sent_ahead(&ship).unwrap();
    assert_eq!(ahead.len(), SAMPLES, "{ahead:?}");
    // The hub restarts (its store reopened), the link comes back the next day.
    cores[1].on_disconnected(&hub);
    let old = std::mem::replace(
        &mut cores[0],
        core_on(3, "spare", Store::in_memory().unwrap(), &clock),
    );
    drop(old);
    clock.fetch_add(DAY_MS, Ordering::SeqCst);
    cores[0] = core_on(1, "hub", Store::open(&path, 1 << 20).unwrap(), &clock);
    cores[0]
        .set_policy(ship, "ship".into(), policy(true))
        .unwrap();
    assert_eq!(cores[0].store().sent_ahead(&ship).unwrap(), ahead);
    let q = connect(&mut cores, 0, 1);
    settle(&mut cores, q);
    days_until_done(&mut cores, &clock);
    let record = ship_record_of(&cores[1], hub);
    assert_eq!(record.duplicates, 0, "{record:?}");
    assert_eq!(
        record.changes_in,
        (ANNOTATIONS + SAMPLES) as u64,
        "{record:?}"
    );
}
