//! Fetching wanted files: which segment to ask of which peer, decided in pure code from the
//! want-list, the connected peers and their answers, with the time handed in. The shell does
//! the I/O (decoding and writing a segment, syncing, moving a finished file into place) and
//! reports back.
//!
//! A segment goes to the source with the fewest asks in flight, so the segments of one file
//! come from several peers at once; when no source can be asked (none connected, or each
//! waiting out an answer), any connected peer is. A segment that fails verification is counted against the
//! peer that sent it, which is not asked for that file again for [`CORRUPT_COOLDOWN_MS`]:
//! the segment is fetched again from another source where there is one.

use std::collections::{BTreeMap, BTreeSet};

use tidesync_proto::NodeId;
use tidesync_proto::files::FileAsk;

use crate::files::FileHash;
use crate::model::{MAX_WANT_SOURCES, PeerFiles, WantRow};

/// Segment asks in flight to one peer (each up to 1 MiB), at most. A peer's window starts at
/// [`INITIAL_ASKS`] and doubles with each window's worth answered, up to what the measured
/// rate delivers within [`ASK_TARGET_SECS`]; it halves when asks time out and then grows back
/// by one for each window's worth answered.
pub const MAX_ASKS_PER_PEER: usize = 16;
/// A peer's ask window before anything was answered.
pub const INITIAL_ASKS: usize = 2;
/// How long the asks in flight to one peer should take to arrive at its measured rate, in
/// seconds: half of how long the network shell lets an ask wait
/// (`netfiles::FILE_REQUEST_TIMEOUT_SECS`).
pub const ASK_TARGET_SECS: u64 = 30;
/// Shortest stretch of answers the rate is measured over, in milliseconds.
pub const RATE_SAMPLE_MS: i64 = 1_000;
/// Asks that fail within this long of a halving, in milliseconds, halve the window no
/// further: the asks in flight on a link too slow for them all fail together, and that is one
/// signal, not sixteen.
pub const ASK_BACKOFF_MS: i64 = 10_000;
/// Segment asks in flight to all peers together: what downloads hold in memory is bounded by
/// this many segments, whatever the files' sizes.
pub const MAX_ASKS_IN_FLIGHT: usize = 32;

/// One download's progress: its segments done (a bitmap of segments) and its last error.
pub type Progress = (FileHash, Vec<u8>, Option<String>);

/// A peer that does not have a file is asked again after this long, in milliseconds (it may
/// be fetching it itself); each further empty answer doubles the wait, up to
/// [`MAX_UNKNOWN_RETRY_MS`], so that files a peer lacks do not keep taking its asks.
pub const UNKNOWN_RETRY_MS: i64 = 5_000;
/// The longest wait before asking a peer again for a file it did not have, in milliseconds.
pub const MAX_UNKNOWN_RETRY_MS: i64 = 120_000;
/// A peer busy serving others is asked again after this long, in milliseconds.
pub const BUSY_RETRY_MS: i64 = 500;
/// A failed ask (timeout, closed stream) is retried from that peer after this long, in
/// milliseconds.
pub const FAILED_RETRY_MS: i64 = 2_000;
/// A peer that sent a segment that does not verify is not asked for that file for this
/// long, in milliseconds.
pub const CORRUPT_COOLDOWN_MS: i64 = 600_000;
/// A download our own disk failed (full, say) is tried again after this long, in
/// milliseconds; its partial file stays.
pub const LOCAL_RETRY_MS: i64 = 5_000;

/// What became of one segment asked of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Verified against the hash and written: `bytes` of file data.
    Verified { bytes: u64 },
    /// It did not verify: the peer's fault.
    Corrupt(String),
    /// The peer has no such file for us.
    Unknown,
    /// The peer is serving all it will.
    Busy,
    /// The ask failed on the way (timeout, closed connection).
    Failed(String),
    /// Our disk failed storing it: not the peer's fault.
    Local(String),
}

/// Which peers a pass of [`Fetcher::plan`] asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// A file's sources that never answered it without its bytes.
    Fresh,
    /// A file's sources.
    Sources,
    /// Any connected peer, for a file none of whose sources can be asked.
    Anyone,
}

/// One wanted file as the fetcher tracks it.
#[derive(Debug)]
struct Fetch {
    row: WantRow,
    segments: u64,
    done: u64,
    /// Segments asked and not answered, with the peer asked.
    in_flight: BTreeMap<u64, NodeId>,
    /// Sources not to ask before the time given (Unix ms).
    wait: BTreeMap<NodeId, i64>,
    /// Empty answers in a row from each peer ("not here").
    empty: BTreeMap<NodeId, u32>,
    /// The lowest segment that may be neither done nor in flight.
    cursor: u64,
    /// Not fetched before this time (our disk failed).
    paused_until: i64,
    /// Progress not yet saved.
    dirty: bool,
    /// Every segment is in; the shell is moving it into place.
    finishing: bool,
}

impl Fetch {
    fn is_done(&self, segment: u64) -> bool {
        self.row
            .done
            .get((segment / 8) as usize)
            .is_some_and(|b| b & (1 << (segment % 8)) != 0)
    }

    fn set_done(&mut self, segment: u64) -> bool {
        if self.is_done(segment) {
            return false;
        }
        let byte = (segment / 8) as usize;
        if self.row.done.len() <= byte {
            self.row.done.resize(byte + 1, 0);
        }
        self.row.done[byte] |= 1 << (segment % 8);
        self.done += 1;
        true
    }
}

/// The downloads of every wanted file.
#[derive(Debug, Default)]
pub struct Fetcher {
    wants: BTreeMap<FileHash, Fetch>,
    /// The wanted files that may have a segment to ask (some not yet asked, not being moved
    /// into place, and not an on-demand file that no read waits for), by size, smallest
    /// first: the order segments are asked in, so that a large file never holds back the
    /// small ones behind it. Kept apart from `wants` so that planning costs what is left to
    /// ask, not the whole want-list (which may hold 100,000 files).
    open: BTreeSet<(u64, FileHash)>,
    /// Files a read waits for, by size: asked before the others.
    requested: BTreeSet<(u64, FileHash)>,
    /// Files whose every segment is in, not yet handed out to be moved into place.
    finished: BTreeSet<FileHash>,
    /// Files the last [`Fetcher::plan`] looked at (what planning costs).
    examined: usize,
    connected: BTreeMap<NodeId, usize>,
    peers: BTreeMap<NodeId, PeerFiles>,
    /// Each peer's ask window (kept across its connections, not across restarts).
    windows: BTreeMap<NodeId, AskWindow>,
}

/// How many segment asks one peer gets at once. The asks in flight share the link, so on a
/// thin one (1 Mbit/s carries 1 MiB in about 8 s) sixteen asks of 1 MiB all outlast their
/// timeout together and no segment ever arrives: the window starts small, grows while the
/// link keeps up, and never asks for more than the measured rate delivers in
/// [`ASK_TARGET_SECS`].
#[derive(Debug, Clone, Copy)]
struct AskWindow {
    size: usize,
    answered: usize,
    halved_ms: i64,
    /// Doubling (until the first timeout), or growing by one.
    slow_start: bool,
    /// Bytes a second the peer's answers arrived at, once measured.
    rate: Option<f64>,
    sample_from_ms: Option<i64>,
    sample_bytes: u64,
}

impl Default for AskWindow {
    fn default() -> AskWindow {
        AskWindow {
            size: INITIAL_ASKS,
            answered: 0,
            halved_ms: i64::MIN,
            slow_start: true,
            rate: None,
            sample_from_ms: None,
            sample_bytes: 0,
        }
    }
}

impl AskWindow {
    fn failed(&mut self, now_ms: i64) {
        self.slow_start = false;
        if now_ms.saturating_sub(self.halved_ms) >= ASK_BACKOFF_MS {
            self.size = (self.size / 2).max(1);
            self.answered = 0;
            self.halved_ms = now_ms;
        }
    }

    fn verified(&mut self, bytes: u64, now_ms: i64) {
        let from = *self.sample_from_ms.get_or_insert(now_ms);
        self.sample_bytes += bytes;
        let span = now_ms.saturating_sub(from);
        if span >= RATE_SAMPLE_MS {
            let rate = self.sample_bytes as f64 * 1_000.0 / span as f64;
            self.rate = Some(self.rate.map_or(rate, |r| (r + rate) / 2.0));
            self.sample_from_ms = Some(now_ms);
            self.sample_bytes = 0;
        }
        self.grow_on_answer();
    }

    /// An ask was answered, with a segment or without one (the peer lacks the file, or is
    /// busy): the link carried it, so the window grows as answers come.
    fn grow_on_answer(&mut self) {
        self.answered += 1;
        if self.answered >= self.size {
            let grown = if self.slow_start {
                self.size * 2
            } else {
                self.size + 1
            };
            self.size = grown.min(self.rate_cap()).min(MAX_ASKS_PER_PEER);
            self.answered = 0;
        }
    }

    /// Asks of a whole segment the measured rate delivers in [`ASK_TARGET_SECS`] (at least
    /// one; no limit before the rate is known).
    fn rate_cap(&self) -> usize {
        self.rate.map_or(usize::MAX, |rate| {
            let bytes = rate * ASK_TARGET_SECS as f64;
            ((bytes / tidesync_proto::files::SEGMENT_BYTES as f64) as usize).max(1)
        })
    }
}

impl Fetcher {
    /// Track `row`, or merge its sources into the file already tracked.
    pub fn want(&mut self, row: WantRow) {
        if let Some(f) = self.wants.get_mut(&row.hash) {
            for s in row.sources {
                if !f.row.sources.contains(&s) && f.row.sources.len() < MAX_WANT_SOURCES {
                    f.row.sources.push(s);
                }
            }
            f.row.on_demand &= row.on_demand;
            let hash = row.hash;
            self.touch(&hash);
            return;
        }
        let segments = FileAsk::segments(row.size);
        let mut fetch = Fetch {
            segments,
            done: 0,
            in_flight: BTreeMap::new(),
            wait: BTreeMap::new(),
            empty: BTreeMap::new(),
            cursor: 0,
            paused_until: i64::MIN,
            dirty: false,
            finishing: false,
            row,
        };
        fetch.row.done.truncate(segments.div_ceil(8) as usize);
        fetch.done = (0..segments).filter(|s| fetch.is_done(*s)).count() as u64;
        let hash = fetch.row.hash;
        self.wants.insert(hash, fetch);
        self.touch(&hash);
    }

    /// Put `hash` in the sets its state says it belongs to (`open`, `finished`), and out of
    /// the others. Called after anything that changes that state.
    fn touch(&mut self, hash: &FileHash) {
        let Some(f) = self.wants.get(hash) else {
            return;
        };
        let key = (f.row.size, *hash);
        let open = !f.finishing
            && f.done < f.segments
            && f.cursor < f.segments
            // An on-demand file is fetched only once a read waits for it.
            && (!f.row.on_demand || self.requested.contains(&key));
        let finished = !f.finishing && f.done == f.segments && f.in_flight.is_empty();
        if open {
            self.open.insert(key);
        } else {
            self.open.remove(&key);
        }
        if finished {
            self.finished.insert(*hash);
        } else {
            self.finished.remove(hash);
        }
    }

    /// Stop tracking `hash` (stored, or no longer wanted).
    pub fn forget(&mut self, hash: &FileHash) {
        if let Some(f) = self.wants.remove(hash) {
            self.open.remove(&(f.row.size, *hash));
            self.requested.remove(&(f.row.size, *hash));
            self.finished.remove(hash);
            for peer in f.in_flight.values() {
                self.release(peer);
            }
        }
    }

    pub fn is_wanted(&self, hash: &FileHash) -> bool {
        self.wants.contains_key(hash)
    }

    /// A read waits for `hash`: fetch it even under `on-demand`. Whether it is wanted.
    pub fn request(&mut self, hash: &FileHash) -> bool {
        match self.wants.get_mut(hash) {
            Some(f) => {
                f.paused_until = i64::MIN;
                self.requested.insert((f.row.size, *hash));
                self.touch(hash);
                true
            }
            None => false,
        }
    }

    pub fn connected(&mut self, peer: NodeId) {
        self.connected.entry(peer).or_insert(0);
    }

    /// A peer's connection is gone: its asks in flight will not be answered.
    pub fn disconnected(&mut self, peer: &NodeId) {
        self.connected.remove(peer);
        let mut touched = Vec::new();
        for (hash, f) in self.wants.iter_mut() {
            let lost: Vec<u64> = f
                .in_flight
                .iter()
                .filter(|(_, p)| *p == peer)
                .map(|(s, _)| *s)
                .collect();
            if !lost.is_empty() {
                touched.push(*hash);
            }
            for s in lost {
                f.in_flight.remove(&s);
                f.cursor = f.cursor.min(s);
            }
        }
        for hash in touched {
            self.touch(&hash);
        }
    }

    fn release(&mut self, peer: &NodeId) {
        if let Some(n) = self.connected.get_mut(peer) {
            *n = n.saturating_sub(1);
        }
    }

    /// The asks to send now: the missing segments of wanted files, each to the connected
    /// source with the fewest asks in flight, within its window (at most
    /// [`MAX_ASKS_PER_PEER`]) and [`MAX_ASKS_IN_FLIGHT`]. Files a read waits for go first, then the rest smallest first.
    pub fn plan(&mut self, now_ms: i64) -> Vec<(NodeId, FileAsk)> {
        let mut total: usize = self.connected.values().sum();
        let mut out = Vec::new();
        self.examined = 0;
        if total >= MAX_ASKS_IN_FLIGHT || self.connected.is_empty() {
            return out;
        }
        let mut visited = Vec::new();
        // Three passes, so that no ask likely to come back empty takes a peer's window from
        // one that would not: first the sources that never answered a file without its
        // bytes, then the sources again after they did (once their wait is over), then other
        // peers for what no source could take.
        for pass in [Pass::Fresh, Pass::Sources, Pass::Anyone] {
            let order = self.requested.iter().map(|(_, h)| h).chain(
                self.open
                    .iter()
                    .filter(|k| !self.requested.contains(k))
                    .map(|(_, h)| h),
            );
            for hash in order {
                // Nothing more can be asked once the total is reached or every connected
                // peer's window is full: stop, rather than walk the rest of the want-list.
                let windows = &self.windows;
                if total >= MAX_ASKS_IN_FLIGHT
                    || !self
                        .connected
                        .iter()
                        .any(|(p, n)| *n < windows.get(p).map_or(INITIAL_ASKS, |w| w.size))
                {
                    break;
                }
                let Some(f) = self.wants.get_mut(hash) else {
                    continue;
                };
                visited.push(*hash);
                // (`order` holds only files a read waits for, or that `touch` found open.)
                if f.finishing || f.paused_until > now_ms || f.done == f.segments {
                    continue;
                }
                while total < MAX_ASKS_IN_FLIGHT && f.cursor < f.segments {
                    let segment = f.cursor;
                    if f.is_done(segment) || f.in_flight.contains_key(&segment) {
                        f.cursor += 1;
                        continue;
                    }
                    let ready = |p: &NodeId| f.wait.get(p).is_none_or(|t| *t <= now_ms);
                    let windows = &self.windows;
                    let room = |p: &NodeId| windows.get(p).map_or(INITIAL_ASKS, |w| w.size);
                    let pick = |peers: &mut dyn Iterator<Item = &NodeId>| {
                        peers
                            .filter(|p| ready(p))
                            .filter_map(|p| self.connected.get(p).map(|n| (*n, *p)))
                            .filter(|(n, p)| *n < room(p))
                            .min()
                    };
                    // When no source can be asked, any connected peer (one that got the object
                    // from elsewhere may hold the file; one that does not, or may not give it to
                    // us, answers as if it had none).
                    let peer = match pass {
                        Pass::Fresh => {
                            pick(&mut f.row.sources.iter().filter(|p| !f.wait.contains_key(p)))
                        }
                        Pass::Sources => pick(&mut f.row.sources.iter()),
                        Pass::Anyone => {
                            let usable = f
                                .row
                                .sources
                                .iter()
                                .any(|p| self.connected.contains_key(p) && ready(p));
                            if usable {
                                None
                            } else {
                                pick(&mut self.connected.keys())
                            }
                        }
                    };
                    let Some((_, peer)) = peer else {
                        break;
                    };
                    f.in_flight.insert(segment, peer);
                    f.cursor += 1;
                    if let Some(n) = self.connected.get_mut(&peer) {
                        *n += 1;
                    }
                    total += 1;
                    out.push((
                        peer,
                        FileAsk {
                            hash: hash.0,
                            size: f.row.size,
                            segment,
                        },
                    ));
                }
            }
        }
        self.examined = visited.len();
        for hash in visited {
            self.touch(&hash);
        }
        out
    }

    /// Files the last [`Fetcher::plan`] looked at.
    pub fn examined(&self) -> usize {
        self.examined
    }

    /// What became of segment `ask.segment` asked of `peer`.
    pub fn answered(&mut self, peer: NodeId, ask: &FileAsk, outcome: Outcome, now_ms: i64) {
        let hash = FileHash(ask.hash);
        let stats = self.peers.entry(peer).or_default();
        let Some(f) = self.wants.get_mut(&hash) else {
            if let Outcome::Verified { bytes } = outcome {
                stats.bytes_in += bytes;
            }
            return;
        };
        let was_ours = f.in_flight.get(&ask.segment) == Some(&peer);
        if was_ours {
            f.in_flight.remove(&ask.segment);
        }
        let error = match outcome {
            Outcome::Verified { bytes } => {
                stats.bytes_in += bytes;
                f.empty.remove(&peer);
                if f.set_done(ask.segment) {
                    f.dirty = true;
                }
                self.windows
                    .entry(peer)
                    .or_default()
                    .verified(bytes, now_ms);
                None
            }
            Outcome::Corrupt(why) => {
                stats.corrupt_segments += 1;
                f.wait.insert(peer, now_ms + CORRUPT_COOLDOWN_MS);
                Some(format!("a segment from {peer} did not verify: {why}"))
            }
            Outcome::Unknown => {
                // Answers without a segment open the window too: otherwise asks that a peer
                // answers "not here" could keep it at one ask, which then never reaches the
                // files it does hold.
                self.windows.entry(peer).or_default().grow_on_answer();
                let n = f.empty.entry(peer).or_insert(0);
                *n = n.saturating_add(1);
                let wait = UNKNOWN_RETRY_MS.saturating_mul(1 << (*n - 1).min(10));
                f.wait.insert(peer, now_ms + wait.min(MAX_UNKNOWN_RETRY_MS));
                Some(format!("{peer} does not have it for us"))
            }
            Outcome::Busy => {
                self.windows.entry(peer).or_default().grow_on_answer();
                f.wait.insert(peer, now_ms + BUSY_RETRY_MS);
                None
            }
            Outcome::Failed(why) => {
                f.wait.insert(peer, now_ms + FAILED_RETRY_MS);
                self.windows.entry(peer).or_default().failed(now_ms);
                Some(format!("asking {peer} failed: {why}"))
            }
            Outcome::Local(why) => {
                f.paused_until = now_ms + LOCAL_RETRY_MS;
                f.row.last_error = Some(why.clone());
                f.dirty = true;
                Some(why)
            }
        };
        if !f.is_done(ask.segment) {
            f.cursor = f.cursor.min(ask.segment);
        }
        if let Some(e) = error {
            if f.row.last_error.as_ref() != Some(&e) {
                f.row.last_error = Some(e.clone());
                f.dirty = true;
            }
            stats.last_error = Some(e);
        }
        if was_ours {
            self.release(&peer);
        }
        self.touch(&hash);
    }

    /// Files whose every segment is in, to move into place; each is handed out once.
    pub fn complete(&mut self) -> Vec<(FileHash, u64)> {
        let mut out = Vec::new();
        for hash in std::mem::take(&mut self.finished) {
            if let Some(f) = self.wants.get_mut(&hash) {
                f.finishing = true;
                out.push((hash, f.row.size));
            }
        }
        out
    }

    /// Moving `hash` into place failed on our side: try again later.
    pub fn finish_failed(&mut self, hash: &FileHash, why: String, now_ms: i64) {
        if let Some(f) = self.wants.get_mut(hash) {
            f.finishing = false;
            f.paused_until = now_ms + LOCAL_RETRY_MS;
            f.row.last_error = Some(why);
            f.dirty = true;
        }
        self.touch(hash);
    }

    /// Progress to save: each changed file's durable segments and last error. The shell
    /// syncs those downloads before it saves this.
    pub fn take_progress(&mut self) -> Vec<Progress> {
        self.wants
            .iter_mut()
            .filter(|(_, f)| f.dirty)
            .map(|(h, f)| {
                f.dirty = false;
                (*h, f.row.done.clone(), f.row.last_error.clone())
            })
            .collect()
    }

    /// A segment `peer` was served, for status.
    pub fn served(&mut self, peer: NodeId, bytes: u64) {
        self.peers.entry(peer).or_default().bytes_out += bytes;
    }

    /// The want-list as status shows it: each file's segments done of all, and the peers.
    pub fn wanted(&self) -> Vec<(WantRow, u64, u64, usize)> {
        self.wants
            .values()
            .map(|f| (f.row.clone(), f.done, f.segments, f.in_flight.len()))
            .collect()
    }

    /// Per peer: wanted files it is a source of, asks in flight, bytes each way, errors.
    pub fn peers(&self) -> BTreeMap<NodeId, PeerFiles> {
        let mut out = self.peers.clone();
        for f in self.wants.values() {
            for s in &f.row.sources {
                out.entry(*s).or_default().wanted += 1;
            }
            for p in f.in_flight.values() {
                out.entry(*p).or_default().transferring += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidesync_proto::files::SEGMENT_BYTES;

    fn node(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn row(n: u8, segments: u64, sources: &[NodeId]) -> WantRow {
        WantRow {
            hash: FileHash([n; 32]),
            size: segments * SEGMENT_BYTES,
            claimant: sources[0],
            sources: sources.to_vec(),
            on_demand: false,
            added_ms: 0,
            done: Vec::new(),
            last_error: None,
        }
    }

    #[test]
    fn small_files_are_asked_for_before_large_ones_and_a_read_before_both() {
        let mut f = Fetcher::default();
        // The large file has the smaller hash, so hash order would take it first.
        f.want(row(1, 100, &[node(9)]));
        f.want(row(2, 1, &[node(9)]));
        f.want(row(3, 2, &[node(9)]));
        f.connected(node(9));
        let mut first: Vec<u8> = Vec::new();
        let mut asks = f.plan(0);
        while first.len() < 4 {
            first.extend(asks.iter().map(|(_, a)| a.hash[0]));
            asks = answer_all(&mut f, &asks, 1);
        }
        assert_eq!(first[..4], [2, 3, 3, 1], "smallest first: {first:?}");
        let mut f = Fetcher::default();
        f.want(row(1, 100, &[node(9)]));
        f.want(row(2, 1, &[node(9)]));
        assert!(f.request(&FileHash([1; 32])));
        f.connected(node(9));
        assert_eq!(
            f.plan(0)[0].1.hash[0],
            1,
            "the file a read waits for goes first"
        );
        f.forget(&FileHash([1; 32]));
        f.forget(&FileHash([2; 32]));
        assert!(f.open.is_empty() && f.finished.is_empty() && f.requested.is_empty());
    }

    /// Answer every ask in `asks` as verified at `now`; the next plan at `now`.
    fn answer_all(f: &mut Fetcher, asks: &[(NodeId, FileAsk)], now: i64) -> Vec<(NodeId, FileAsk)> {
        for (peer, ask) in asks {
            let verified = Outcome::Verified {
                bytes: SEGMENT_BYTES,
            };
            f.answered(*peer, ask, verified, now);
        }
        f.plan(now)
    }

    // Regression (filebench case 2, 2026-12-07: 10,000 files of 200 KB took 105 s, three times
    // as long as before): planning walked the whole want-list, three times, after every
    // event the node handled, because one peer's window (16 asks) filled before the total
    // (32) did and nothing stopped the walk. Planning now looks only at files with segments
    // left to ask, and stops as soon as no connected peer has room.
    #[test]
    fn planning_costs_what_can_be_asked_not_the_whole_want_list() {
        let mut f = Fetcher::default();
        for n in 0..5_000u32 {
            let mut r = row(0, 1, &[node(9)]);
            r.hash = FileHash(blake3::hash(&n.to_le_bytes()).into());
            f.want(r);
        }
        f.connected(node(9));
        let mut asks = f.plan(0);
        let mut stored = 0;
        let mut most = 0;
        while !asks.is_empty() {
            assert!(asks.len() <= MAX_ASKS_PER_PEER);
            // With the window full, nothing is looked at.
            assert!(f.plan(0).is_empty());
            assert_eq!(f.examined(), 0);
            asks = answer_all(&mut f, &asks, 1);
            most = most.max(f.examined());
            stored += f.complete().len();
        }
        assert_eq!(stored, 5_000, "every file completes, each handed out once");
        // At most the files asked of, each once per pass (the last few files, when fewer
        // remain than the window holds), never the 5,000.
        assert!(
            most <= 3 * MAX_ASKS_PER_PEER,
            "a plan looked at {most} files for at most {MAX_ASKS_PER_PEER} asks"
        );
    }

    // Regression (simulation seeds 120, 104 and 1222 with files, 2026-12-06): a peer whose
    // window was down to one ask (after failed asks, with a low measured rate) spent it each
    // round on smaller files it answered "not here", retried in turn as their waits ran out,
    // so a file it held and was the source of was never asked for. Answers without a segment
    // now grow the window too (within the rate's cap), each round asks sources that never came
    // back empty first, and a peer's "not here" for a file doubles the wait before asking it
    // again, up to two minutes.
    #[test]
    fn files_a_peer_lacks_do_not_starve_one_it_holds() {
        let mut f = Fetcher::default();
        let peer = node(9);
        f.connected(peer);
        // Two small files arrive two seconds apart: a measured rate of 1 kB/s caps the window
        // at one ask; a failed ask then takes it there.
        for (n, now) in [(200u8, 0), (201, 2_000)] {
            let mut r = row(n, 1, &[peer]);
            r.size = 1_000;
            f.want(r);
            for (p, ask) in f.plan(now) {
                f.answered(p, &ask, Outcome::Verified { bytes: 1_000 }, now);
            }
            f.forget(&FileHash([n; 32]));
        }
        f.want(row(202, 1, &[peer]));
        for (p, ask) in f.plan(2_500) {
            f.answered(p, &ask, Outcome::Failed("timed out".into()), 2_500);
        }
        f.forget(&FileHash([202; 32]));
        // Eight small files the peer does not have, and a larger one it has, asked once
        // before, when the peer did not have it yet.
        let held = FileHash([100; 32]);
        f.want(row(100, 3, &[peer]));
        for (p, ask) in f.plan(3_000) {
            f.answered(p, &ask, Outcome::Unknown, 3_000);
        }
        for n in 1..=8 {
            let mut r = row(n, 1, &[peer]);
            r.size = 1_000 + u64::from(n);
            f.want(r);
        }
        let mut asked_at = None;
        for round in 0..300 {
            let now = 4_000 + round * 1_000;
            let asks = f.plan(now);
            assert!(asks.len() <= 1, "the window stays at one ask");
            for (p, ask) in asks {
                let outcome = if FileHash(ask.hash) == held {
                    asked_at = asked_at.or(Some(round));
                    Outcome::Verified {
                        bytes: SEGMENT_BYTES,
                    }
                } else {
                    Outcome::Unknown
                };
                f.answered(p, &ask, outcome, now);
            }
            if asked_at.is_some() {
                break;
            }
        }
        assert!(
            asked_at.is_some(),
            "the file the peer holds was never asked for again"
        );
    }

    // Regression (shipbench, 1 Mbit/s, 2026-12-06): sixteen asks of 1 MiB in flight to one
    // peer share the link, so at 1 Mbit/s each took over two minutes to arrive, longer than an
    // ask may wait: every ask timed out, was asked again, and no file ever arrived. A peer's
    // window now starts at two asks, doubles while answers come, stops at what the measured
    // rate delivers in `ASK_TARGET_SECS`, and halves when asks time out (once per burst).
    #[test]
    fn a_peers_asks_grow_with_its_answers_and_shrink_when_they_time_out() {
        let mut f = Fetcher::default();
        f.want(row(1, 10_000, &[node(1)]));
        f.connected(node(1));
        // A fast link: 1 MiB answers every few milliseconds, the window doubles to the cap.
        let mut asks = f.plan(0);
        let mut sizes = vec![asks.len()];
        for round in 1..8 {
            asks = answer_all(&mut f, &asks, round * 5);
            sizes.push(asks.len());
        }
        assert_eq!(sizes[..4], [2, 4, 8, 16], "{sizes:?}");
        assert_eq!(sizes.last(), Some(&MAX_ASKS_PER_PEER));
        // The whole window times out together: one halving.
        for (peer, ask) in &asks {
            f.answered(*peer, ask, Outcome::Failed("timeout".into()), 60_000);
        }
        asks = f.plan(70_000);
        assert_eq!(asks.len(), MAX_ASKS_PER_PEER / 2);
        // Then it grows by one for each window's worth answered.
        let mut now = 70_000;
        let mut sizes = Vec::new();
        while sizes.len() < 12 {
            sizes.push(asks.len());
            now += 5;
            asks = answer_all(&mut f, &asks, now);
        }
        assert_eq!(sizes[..3], [8, 9, 10], "{sizes:?}");
    }

    #[test]
    fn on_a_thin_link_the_asks_stop_at_what_arrives_in_the_target_time() {
        let mut f = Fetcher::default();
        f.want(row(1, 10_000, &[node(1)]));
        f.connected(node(1));
        // 125 kB/s (1 Mbit/s): the asks in flight share it, so a window of n asks of 1 MiB
        // is answered after n * 8.4 s.
        let ms_per_segment = (SEGMENT_BYTES as f64 / 125.0) as i64;
        let mut now = 0;
        let mut asks = f.plan(now);
        let mut largest = 0;
        for _ in 0..20 {
            largest = largest.max(asks.len());
            now += ms_per_segment * asks.len() as i64;
            asks = answer_all(&mut f, &asks, now);
        }
        let in_target = (125_000 * ASK_TARGET_SECS / SEGMENT_BYTES) as usize;
        assert!(
            largest <= in_target.max(INITIAL_ASKS * 2),
            "{largest} > {in_target}"
        );
        assert!(
            largest * ms_per_segment as usize <= 60_000,
            "asks would time out"
        );
    }

    #[test]
    fn segments_spread_over_sources_within_the_caps_and_complete_once() {
        let mut f = Fetcher::default();
        f.want(row(1, 100, &[node(1), node(2)]));
        assert!(f.plan(0).is_empty(), "no source connected");
        f.connected(node(1));
        f.connected(node(2));
        let asks = f.plan(0);
        assert_eq!(asks.len(), 2 * INITIAL_ASKS);
        let to_1 = asks.iter().filter(|(p, _)| *p == node(1)).count();
        assert_eq!(to_1, INITIAL_ASKS, "both peers get asks");
        assert!(f.plan(0).is_empty(), "every slot is taken");
        for (peer, ask) in &asks {
            f.answered(
                *peer,
                ask,
                Outcome::Verified {
                    bytes: SEGMENT_BYTES,
                },
                1,
            );
        }
        let mut rounds = 0;
        loop {
            let asks = f.plan(1);
            if asks.is_empty() {
                break;
            }
            for (peer, ask) in &asks {
                f.answered(
                    *peer,
                    ask,
                    Outcome::Verified {
                        bytes: SEGMENT_BYTES,
                    },
                    1,
                );
            }
            rounds += 1;
        }
        assert!(rounds >= 2);
        assert_eq!(f.complete(), vec![(FileHash([1; 32]), 100 * SEGMENT_BYTES)]);
        assert!(f.complete().is_empty(), "handed out once");
        let progress = f.take_progress();
        let mut all = vec![0xff; 12];
        all.push(0x0f);
        assert_eq!(progress[0].1, all);
        assert!(f.take_progress().is_empty());
        assert_eq!(
            f.peers()[&node(1)].bytes_in + f.peers()[&node(2)].bytes_in,
            100 * SEGMENT_BYTES
        );
    }

    #[test]
    fn a_corrupt_segment_is_fetched_again_from_another_peer() {
        let mut f = Fetcher::default();
        f.want(row(1, 1, &[node(1), node(2)]));
        f.connected(node(1));
        f.connected(node(2));
        let asks = f.plan(0);
        assert_eq!(asks.len(), 1);
        let (bad, ask) = asks[0];
        f.answered(bad, &ask, Outcome::Corrupt("leaf".into()), 10);
        let again = f.plan(10);
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].0, bad, "the peer that lied is not asked again");
        assert_eq!(again[0].1, ask);
        assert_eq!(f.peers()[&bad].corrupt_segments, 1);
        // With the honest peer gone, the liar waits out its cooldown.
        f.disconnected(&again[0].0);
        assert!(f.plan(20).is_empty());
        assert_eq!(f.plan(10 + CORRUPT_COOLDOWN_MS).len(), 1);
    }

    #[test]
    fn with_no_source_to_ask_any_connected_peer_is_asked() {
        let mut f = Fetcher::default();
        f.want(row(1, 1, &[node(1)]));
        f.connected(node(3));
        let asks = f.plan(0);
        assert_eq!(asks.len(), 1);
        assert_eq!(asks[0].0, node(3));
        f.answered(node(3), &asks[0].1, Outcome::Unknown, 0);
        assert!(
            f.plan(1).is_empty(),
            "it said it has none: asked again later"
        );
        f.connected(node(1));
        assert_eq!(f.plan(1)[0].0, node(1), "the source, once it is up");
    }

    #[test]
    fn progress_survives_a_restart_and_on_demand_waits_for_a_read() {
        let mut f = Fetcher::default();
        let mut r = row(1, 10, &[node(1)]);
        r.done = vec![0b1111_0111, 0b01];
        f.want(r);
        f.connected(node(1));
        let asks = f.plan(0);
        let segments: Vec<u64> = asks.iter().map(|(_, a)| a.segment).collect();
        assert_eq!(segments, vec![3, 9], "only the missing segments");
        assert!(answer_all(&mut f, &asks, 1).is_empty());
        assert_eq!(f.complete(), vec![(FileHash([1; 32]), 10 * SEGMENT_BYTES)]);
        let mut lazy = row(2, 3, &[node(1)]);
        lazy.on_demand = true;
        f.want(lazy);
        assert!(f.plan(0).is_empty());
        assert!(f.request(&FileHash([2; 32])));
        assert_eq!(f.plan(0).len(), 3);
        // An empty file is complete at once.
        f.want(row(3, 0, &[node(1)]));
        assert_eq!(f.complete(), vec![(FileHash([3; 32]), 0)]);
    }

    #[test]
    fn a_disk_error_pauses_the_file_without_blaming_the_peer() {
        let mut f = Fetcher::default();
        f.want(row(1, 2, &[node(1)]));
        f.connected(node(1));
        let asks = f.plan(0);
        f.answered(node(1), &asks[0].1, Outcome::Local("disk full".into()), 0);
        f.answered(node(1), &asks[1].1, Outcome::Verified { bytes: 1 }, 0);
        assert!(f.plan(1).is_empty(), "paused");
        assert_eq!(
            f.plan(LOCAL_RETRY_MS).len(),
            1,
            "resumes, from the same peer"
        );
        assert_eq!(f.peers()[&node(1)].corrupt_segments, 0);
    }
}
