//! Metered and windowed links in a simulated world: which sides of which links carry a daily
//! budget, sync windows and a rate; the clock's jumps that open windows and turn days; and
//! the ledger of bytes each node sent each peer, against which the link invariants are
//! checked as each message leaves:
//! - no peer ever receives more batch bytes in a UTC day than its budget allows;
//! - no batch starts outside its link's windows;
//!
//! and, before the heal (`invariants::check_meters`), every byte that crossed was counted by
//! the sender's durable meter, across crashes.
//!
//! Shaped worlds draw all of this from a stream of their own (see [`Shaping::draw`]), so
//! the rest of the world's draws stay as they are.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tidesync::link::{DAY_MS, Link, Window};
use tidesync_proto::Message;

use crate::options::{Violation, fail};

/// Chance, in thousandths, that simulated time jumps ahead at a step of a shaped world.
const JUMP_PER_MILLE: u32 = 20;
/// Most minutes one jump of the clock spans.
const MAX_JUMP_MINUTES: i64 = 8 * 60;
/// The smallest and largest daily budget drawn, in bytes: small enough that the workload
/// spends it, large enough for a batch of a few changes.
const BUDGET_BYTES: (u64, u64) = (4 * 1024, 64 * 1024);

/// The shaped links of a world and what crossed them.
#[derive(Debug, Default)]
pub struct Shaping {
    /// (me, peer): the link settings of `me`'s policy for `peer`.
    pub links: BTreeMap<(usize, usize), Link>,
    /// (from, to, UTC day): frame bytes of every message `from` sent `to` that day.
    sent: BTreeMap<(usize, usize, i64), u64>,
    /// (from, to, UTC day): frame bytes of the batches among them.
    batches: BTreeMap<(usize, usize, i64), u64>,
    /// The world's own stream for shaping and jumps.
    rng: Option<StdRng>,
}

impl Shaping {
    /// No shaping (`shaped` false), or each side of each link shaped with a chance of one
    /// half: a budget, one or two windows and sometimes a rate.
    pub(crate) fn draw(seed: u64, shaped: bool, links: &[(usize, usize)]) -> Shaping {
        if !shaped {
            return Shaping::default();
        }
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5ba9_ed11_4c5e_d0e5);
        let mut shaping = Shaping::default();
        for &(a, b) in links {
            for side in [(a, b), (b, a)] {
                if rng.random_bool(0.5) {
                    let link = draw_link(&mut rng);
                    shaping.links.insert(side, link);
                }
            }
        }
        shaping.rng = Some(rng);
        shaping
    }

    /// Minutes the clock jumps ahead at this step, if it does.
    pub(crate) fn jump(&mut self) -> Option<i64> {
        let rng = self.rng.as_mut()?;
        (rng.random_range(0..1000) < JUMP_PER_MILLE).then(|| rng.random_range(1..=MAX_JUMP_MINUTES))
    }
    /// `msg` leaves honest node `from` for `to` at `now_ms`: enter it in the ledger and check
    /// the link's rules.
    pub(crate) fn sent(
        &mut self,
        from: usize,
        to: usize,
        msg: &Message,
        now_ms: i64,
        phase: &str,
    ) -> Result<(), Violation> {
        let Some(link) = self.links.get(&(from, to)) else {
            return Ok(());
        };
        let bytes = tidesync_proto::wire::frame_bytes(msg) as u64;
        let day = now_ms.div_euclid(DAY_MS);
        *self.sent.entry((from, to, day)).or_default() += bytes;
        if !matches!(msg, Message::Changes { .. } | Message::Ahead { .. }) {
            return Ok(());
        }
        let minute = (now_ms.rem_euclid(DAY_MS) / 60_000) as u16;
        if !link.windows.is_empty() && !link.windows.iter().any(|win| win.contains(minute)) {
            let windows: Vec<String> = link.windows.iter().map(|&win| win.into()).collect();
            return Err(fail(
                phase,
                format!(
                    "node {from} started a batch to {to} at {:02}:{:02} UTC, outside its windows {}",
                    minute / 60,
                    minute % 60,
                    windows.join(", ")
                ),
            ));
        }
        let budget = link.budget.unwrap_or(u64::MAX);
        let total = self.batches.entry((from, to, day)).or_default();
        *total += bytes;
        if *total > budget {
            return Err(fail(
                phase,
                format!(
                    "node {from} sent {to} {total} bytes of batches on day {day}, over its budget of {budget}"
                ),
            ));
        }
        Ok(())
    }

    /// Each link side with a budget, and the frame bytes that crossed it on the UTC day of
    /// `now_ms`: (me, peer, bytes).
    pub(crate) fn budgeted_today(&self, now_ms: i64) -> Vec<(usize, usize, u64)> {
        let day = now_ms.div_euclid(DAY_MS);
        self.links
            .iter()
            .filter(|(_, link)| link.budget.is_some())
            .map(|(&(me, peer), _)| {
                let crossed = self.sent.get(&(me, peer, day)).copied().unwrap_or(0);
                (me, peer, crossed)
            })
            .collect()
    }
}

fn draw_link(rng: &mut StdRng) -> Link {
    let windows = (0..rng.random_range(1..=2u16))
        .map(|_| {
            let start = rng.random_range(0..1_440u16);
            let length = rng.random_range(30..=360u16);
            Window {
                start,
                end: (start + length) % 1_440,
            }
        })
        .collect();
    Link {
        max_rate: rng
            .random_bool(0.3)
            .then(|| rng.random_range(1_000..=50_000)),
        windows,
        budget: Some(rng.random_range(BUDGET_BYTES.0..=BUDGET_BYTES.1)),
        // UTC: the ledger's days and windows are UTC ones (named zones: `link.rs`'s tests).
        zone: None,
        // The simulated network has no transports to choose between.
        prefer: None,
    }
}
