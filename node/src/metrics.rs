//! The Prometheus registry a running node serves at `GET /metrics`: its histograms, the series
//! read from its status at each scrape, and libp2p's own connection metrics.
//!
//! Every series is prefixed `tidesync_`; libp2p's are prefixed `libp2p_`. Counters count since
//! the store was made unless their HELP says "since start". The output is the OpenMetrics
//! text format (which Prometheus reads), ending in `# EOF`.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::reads::Status;

/// The media type `GET /metrics` answers with.
pub const METRICS_MEDIA_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The histograms the node actor observes. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Timers {
    /// A local write (put, delete, resolve, many puts), from the actor taking it to its
    /// durable commit, seconds.
    pub write: Histogram,
    /// A received batch's signature verification, application and commit, seconds.
    pub batch_verify: Histogram,
    pub batch_apply: Histogram,
    pub batch_commit: Histogram,
}

impl Timers {
    fn register(registry: &mut Registry) -> Timers {
        // 0.1 ms to about 26 s.
        let buckets = || Histogram::new(exponential_buckets(0.000_1, 4.0, 10));
        let timers = Timers {
            write: buckets(),
            batch_verify: buckets(),
            batch_apply: buckets(),
            batch_commit: buckets(),
        };
        for (name, help, h) in [
            (
                "tidesync_local_write",
                "Local writes, from the node actor taking one to its durable commit (since start)",
                &timers.write,
            ),
            (
                "tidesync_batch_verify",
                "Signature verification of each received batch on the node actor; a batch verified ahead of it spends almost none there (since start)",
                &timers.batch_verify,
            ),
            (
                "tidesync_batch_apply",
                "Application of each received batch to its documents (since start)",
                &timers.batch_apply,
            ),
            (
                "tidesync_batch_commit",
                "The durable commit of each received batch (since start)",
                &timers.batch_commit,
            ),
        ] {
            registry.register_with_unit(name, help, Unit::Seconds, h.clone());
        }
        timers
    }
}

/// The registry, shared by the API's scrapes; the last status read is what its collector shows.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    snapshot: Arc<Mutex<Option<Status>>>,
}

/// What the daemon hands out when it starts: the registry for the API, the histograms for the
/// node actor and libp2p's recorder for the network actor.
pub struct Instruments {
    pub metrics: Metrics,
    pub timers: Timers,
    pub libp2p: libp2p::metrics::Metrics,
}

impl Instruments {
    pub fn new() -> Instruments {
        let mut registry = Registry::default();
        let libp2p = libp2p::metrics::Metrics::new(&mut registry);
        let timers = Timers::register(&mut registry);
        let snapshot = Arc::new(Mutex::new(None));
        registry.register_collector(Box::new(StatusCollector {
            snapshot: Arc::clone(&snapshot),
        }));
        Instruments {
            metrics: Metrics {
                registry: Arc::new(registry),
                snapshot,
            },
            timers,
            libp2p,
        }
    }
}

impl Default for Instruments {
    fn default() -> Self {
        Instruments::new()
    }
}

impl Metrics {
    /// The registry's text, with the series read from `status` (taken just now).
    pub fn encode(&self, status: Status) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        // One scrape at a time: the collector reads the snapshot this scrape set.
        let mut snapshot = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        *snapshot = Some(status);
        drop(snapshot);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The series read from the node's status at each scrape.
#[derive(Debug)]
struct StatusCollector {
    snapshot: Arc<Mutex<Option<Status>>>,
}

/// Labels of one series.
type Labels = Vec<(&'static str, String)>;
/// A family's series: labels and value.
type Series = Vec<(Labels, u64)>;

/// Encode one family of gauges (`counter` false) or counters from `(labels, value)` pairs.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counter: bool,
    series: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    if series.is_empty() {
        return Ok(());
    }
    let metric_type = if counter {
        ConstCounter::new(0u64).metric_type()
    } else {
        ConstGauge::new(0i64).metric_type()
    };
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in series {
        let encoder = metric.encode_family(labels)?;
        if counter {
            ConstCounter::new(*value).encode(encoder)?;
        } else {
            ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(encoder)?;
        }
    }
    Ok(())
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = snapshot.as_ref() else {
            return Ok(());
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let node: Labels = vec![];
        let one = |v: u64| vec![(node.clone(), v)];
        let gauges: [(&str, &str, u64); 9] = [
            (
                "tidesync_store_bytes",
                "Size of the store file, bytes",
                s.store_bytes,
            ),
            (
                "tidesync_log_last_seq",
                "The last SEQ of this node's change log",
                s.last_seq,
            ),
            (
                "tidesync_held_changes",
                "Received changes held until their dependencies arrive",
                s.held_changes,
            ),
            (
                "tidesync_concurrent_fields",
                "Fields holding concurrent values, over all objects (the conflicts inbox)",
                s.concurrent_fields,
            ),
            (
                "tidesync_name_collisions",
                "Objects kept under a collision name (the conflicts inbox)",
                s.collisions,
            ),
            (
                "tidesync_equivocations",
                "Equivocations found: an author signed two changes with one actor and sequence number",
                s.equivocations,
            ),
            (
                "tidesync_refusals_logged",
                "Changes refused by policy in the refusal log (its newest entries)",
                s.refusals_logged,
            ),
            (
                "tidesync_files_wanted",
                "Files on the want-list",
                s.files.wanted,
            ),
            (
                "tidesync_files_missing_bytes",
                "Bytes of wanted files not yet stored",
                s.files.missing_bytes,
            ),
        ];
        for (name, help, v) in gauges {
            family(&mut encoder, name, help, false, &one(v))?;
        }
        let counters: [(&str, &str, u64); 7] = [
            (
                "tidesync_sync_frames_received",
                "Sync frames received (since start)",
                s.net.frames_in,
            ),
            (
                "tidesync_sync_frames_sent",
                "Sync frames sent (since start)",
                s.net.frames_out,
            ),
            (
                "tidesync_file_bytes_received",
                "Bytes of the files protocol received (since start)",
                s.net.file_bytes_in,
            ),
            (
                "tidesync_file_bytes_sent",
                "Bytes of the files protocol sent (since start)",
                s.net.file_bytes_out,
            ),
            (
                "tidesync_connections_refused",
                "Incoming connections refused: peer not configured or over the limits (since start)",
                s.refused_connections,
            ),
            (
                "tidesync_discovered_unconfigured",
                "Nodes that are not configured found by mDNS, never dialled (since start)",
                s.discovered_strangers,
            ),
            (
                "tidesync_discovered_peers",
                "Configured peers found by mDNS (since start)",
                s.discovered_peers,
            ),
        ];
        for (name, help, v) in counters {
            family(&mut encoder, name, help, true, &one(v))?;
        }
        let objects: Vec<(Labels, u64)> = s
            .objects
            .iter()
            .map(|(ty, c)| (vec![("type", ty.clone())], c.live))
            .collect();
        family(
            &mut encoder,
            "tidesync_objects",
            "Live objects, per type",
            false,
            &objects,
        )?;
        let peer = |p: &crate::reads::PeerStatus| -> Labels { vec![("peer", p.name.clone())] };
        let per_peer =
            |f: &dyn Fn(&crate::reads::PeerStatus) -> Option<u64>| -> Vec<(Labels, u64)> {
                s.peers
                    .iter()
                    .filter_map(|p| f(p).map(|v| (peer(p), v)))
                    .collect()
            };
        let peer_gauges: [(&str, &str, Series); 5] = [
            (
                "tidesync_peer_connected",
                "1 while the peer is connected",
                per_peer(&|p| Some(u64::from(p.connected))),
            ),
            (
                "tidesync_peer_lag_out_changes",
                "At most this many of our log entries are not yet acknowledged by the peer",
                per_peer(&|p| Some(p.pending_out)),
            ),
            (
                "tidesync_peer_lag_in_changes",
                "At most this many of the peer's log entries have not reached us (while connected)",
                per_peer(&|p| Some(p.pending_in)),
            ),
            (
                "tidesync_peer_held_changes",
                "Changes from the peer held for missing dependencies",
                per_peer(&|p| Some(p.held)),
            ),
            (
                "tidesync_peer_seconds_since_sync",
                "Seconds since a batch from or to the peer was last stored or acknowledged (absent if never)",
                per_peer(&|p| {
                    p.last_sync_ms
                        .map(|t| (now_ms.saturating_sub(t).max(0) / 1000) as u64)
                }),
            ),
        ];
        for (name, help, series) in peer_gauges {
            family(&mut encoder, name, help, false, &series)?;
        }
        let files = |p: &crate::reads::PeerStatus| s.files.peers.get(&p.id);
        let peer_counters: [(&str, &str, Series); 8] = [
            (
                "tidesync_peer_changes_received",
                "Changes received from the peer and stored",
                per_peer(&|p| Some(p.changes_in)),
            ),
            (
                "tidesync_peer_changes_sent",
                "Changes sent to the peer",
                per_peer(&|p| Some(p.changes_out)),
            ),
            (
                "tidesync_peer_sync_bytes_received",
                "Bytes of sync frames from the peer (since start)",
                per_peer(&|p| Some(p.bytes_in)),
            ),
            (
                "tidesync_peer_sync_bytes_sent",
                "Bytes of sync frames to the peer (since start)",
                per_peer(&|p| Some(p.bytes_out)),
            ),
            (
                "tidesync_peer_file_bytes_received",
                "File bytes verified from the peer (since start)",
                per_peer(&|p| Some(files(p).map_or(0, |f| f.bytes_in))),
            ),
            (
                "tidesync_peer_file_bytes_sent",
                "File bytes served to the peer (since start)",
                per_peer(&|p| Some(files(p).map_or(0, |f| f.bytes_out))),
            ),
            (
                "tidesync_peer_duplicates",
                "Changes the peer sent that this node already had (dropped)",
                per_peer(&|p| Some(p.duplicates)),
            ),
            (
                "tidesync_peer_rejected_by_peer",
                "Changes we sent that the peer reported rejecting",
                per_peer(&|p| Some(p.rejected_by_peer)),
            ),
        ];
        for (name, help, series) in peer_counters {
            family(&mut encoder, name, help, true, &series)?;
        }
        let mut refused: Vec<(Labels, u64)> = Vec::new();
        for p in &s.peers {
            let by_policy: u64 = p.rejected_types.values().sum();
            for (ty, n) in &p.rejected_types {
                refused.push((
                    vec![
                        ("peer", p.name.clone()),
                        ("reason", "policy".into()),
                        ("type", ty.clone()),
                    ],
                    *n,
                ));
            }
            refused.push((
                vec![
                    ("peer", p.name.clone()),
                    ("reason", "verification".into()),
                    ("type", String::new()),
                ],
                p.rejected.saturating_sub(by_policy),
            ));
            refused.push((
                vec![
                    ("peer", p.name.clone()),
                    ("reason", "no-room".into()),
                    ("type", String::new()),
                ],
                p.held_refused_for_room,
            ));
        }
        family(
            &mut encoder,
            "tidesync_peer_refused_changes",
            "Changes from the peer refused, by reason (policy, per type; verification; no room to hold them)",
            true,
            &refused,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_has_help_and_the_text_ends_in_eof() {
        let instruments = Instruments::new();
        instruments.timers.write.observe(0.002);
        let status: Status = serde_json::from_value(serde_json::json!({
            "node": "n", "name": "lab", "running": true,
            "objects": {"Sample": {"live": 3, "deleted": 1}},
            "last_seq": 7, "store_bytes": 4096, "held_changes": 0,
            "peers": [{
                "name": "hub", "id": "x", "addrs": [], "connected": true,
                "connected_since_ms": 1, "last_sync_ms": 1, "pending_out": 2, "pending_in": 0,
                "changes_in": 5, "changes_out": 6, "rejected": 4, "rejected_by_peer": 0,
                "duplicates": 1, "rejected_types": {"User": 3}
            }]
        }))
        .unwrap();
        let text = instruments.metrics.encode(status).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("tidesync_objects{type=\"Sample\"} 3"),
            "{text}"
        );
        assert!(text.contains("tidesync_peer_refused_changes_total{peer=\"hub\",reason=\"policy\",type=\"User\"} 3"), "{text}");
        assert!(text.contains("tidesync_peer_refused_changes_total{peer=\"hub\",reason=\"verification\",type=\"\"} 1"), "{text}");
        assert!(
            text.contains("tidesync_local_write_seconds_count 1"),
            "{text}"
        );
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
    }
}
